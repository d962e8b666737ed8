//! A stored message's place in the commit order, as clients see it in `meta.offset` and give
//! it back in `config.broadcast.replay.offset` to resume after it.
//!
//! It is the commit LSN of the transaction that stored the message and the message's index
//! within that transaction, so it comes from the WAL, not from the worker: the same after any
//! restart and on every node. The text form is fixed-width upper-case hex
//! (`0000000001A2B3C4-00000000`), so comparing two offsets as strings compares their order.

use std::fmt;
use std::str::FromStr;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Offset {
    pub lsn: u64,
    pub index: u32,
}

impl Offset {
    pub fn new(lsn: u64, index: u32) -> Offset {
        Offset { lsn, index }
    }

    /// The LSN in PostgreSQL's `pg_lsn` text form (`16/B374D848`).
    pub fn lsn_text(&self) -> String {
        format!("{:X}/{:X}", self.lsn >> 32, self.lsn & 0xFFFF_FFFF)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}-{:08X}", self.lsn, self.index)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct InvalidOffset;

impl FromStr for Offset {
    type Err = InvalidOffset;

    fn from_str(s: &str) -> Result<Offset, InvalidOffset> {
        let (lsn, index) = s.split_once('-').ok_or(InvalidOffset)?;
        let hex =
            |t: &str, width: usize| t.len() == width && t.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(lsn, 16) || !hex(index, 8) {
            return Err(InvalidOffset);
        }
        let lsn = u64::from_str_radix(lsn, 16).map_err(|_| InvalidOffset)?;
        let index = u32::from_str_radix(index, 16).map_err(|_| InvalidOffset)?;
        Ok(Offset { lsn, index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_orders_like_the_offsets() {
        let a = Offset::new(0x1_6B3F_28A0, 2);
        assert_eq!(a.to_string(), "000000016B3F28A0-00000002");
        assert_eq!("000000016B3F28A0-00000002".parse(), Ok(a));
        assert_eq!("000000016b3f28a0-00000002".parse(), Ok(a));
        assert_eq!(a.lsn_text(), "1/6B3F28A0");
        let offsets = [
            Offset::new(1, 0),
            Offset::new(1, 1),
            Offset::new(2, 0),
            Offset::new(u64::MAX, u32::MAX),
        ];
        for pair in offsets.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(pair[0].to_string() < pair[1].to_string());
        }
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "-",
            "1-2",
            "000000016B3F28A0",
            "000000016B3F28A0-0000002",
            "000000016B3F28A0-000000002",
            "+00000016B3F28A0-00000002",
            "000000016B3F28A0-0000000g",
            "000000016B3F28A0_00000002",
            "0000000é6B3F28A0-00000002",
        ] {
            assert_eq!(bad.parse::<Offset>(), Err(InvalidOffset), "{bad:?}");
        }
    }
}
