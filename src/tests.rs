//! In-backend tests (`cargo pgrx test`): they run inside a transaction that is rolled back, so
//! they cover the SQL surface, never delivery (see pgrx-tests/ for that).
