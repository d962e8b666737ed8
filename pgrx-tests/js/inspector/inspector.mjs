// Drives the inspector page in headless Chromium: join a public topic with a pasted token, see a
// message sent from SQL and one sent from the page, see the connection count, then see the
// refusal reason of a private join. Started by pgrx-tests/tests/operations.rs, which starts the
// cluster and passes its coordinates in the environment. Exits non-zero on any failure.
import { chromium } from 'playwright-core'
import pg from 'pg'
import { mkdirSync } from 'node:fs'
import { dirname } from 'node:path'

const env = (name) => {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set: run this through cargo test -p realtime-integration-tests`)
  return value
}
const HTTP_URL = env('PG_REALTIME_HTTP_URL')
const PG_URL = env('PG_REALTIME_PG_URL')
const TOKEN = env('PG_REALTIME_TOKEN')
const SCREENSHOT = env('PG_REALTIME_SCREENSHOT')
const PUBLIC_TOPIC = env('PG_REALTIME_PUBLIC_TOPIC')
const PRIVATE_TOPIC = env('PG_REALTIME_PRIVATE_TOPIC')
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium'
const WAIT = 20000

// Anything the page asks of another host is a failure: it must work offline.
const offHost = []
const isLocal = (url) => {
  const u = new URL(url)
  return u.protocol === 'data:' || u.protocol === 'about:' || u.hostname === '127.0.0.1'
}

const db = new pg.Client({ connectionString: PG_URL })
await db.connect()
let step = 'start'
const consoleErrors = []
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ['--no-sandbox', '--headless=new', '--disable-gpu'],
})
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } })
    page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(m.text())
  })
  page.on('pageerror', (e) => consoleErrors.push(String(e)))
  page.on('websocket', (ws) => {
    if (!isLocal(ws.url().replace(/^ws/, 'http'))) offHost.push(ws.url())
  })
  await page.route('**/*', (route) => {
    const url = route.request().url()
    if (isLocal(url)) return route.continue()
    offHost.push(url)
    return route.abort('blockedbyclient')
  })

  const response = await page.goto(`${HTTP_URL}/inspector`)
  if (!response.ok()) throw new Error(`GET /inspector answered ${response.status()}`)
  const csp = response.headers()['content-security-policy'] || ''
  if (!csp.includes("default-src 'self'")) throw new Error(`no CSP on the page: ${csp}`)

  // Public topic: a message from SQL shows up in the page.
  step = 'join the public topic'
  await page.fill('#token', TOKEN)
  await page.fill('#topic', PUBLIC_TOPIC)
  await page.fill('#presence-key', 'inspector-test')
  await page.click('#join')
  await page.waitForFunction(() => document.getElementById('state').textContent.startsWith('joined'), null, { timeout: WAIT })
  step = 'see the message sent from SQL'
  await db.query("SELECT realtime.send('{\"from\": \"sql\"}', 'from-sql', $1, false)", [PUBLIC_TOPIC])
  await page.waitForFunction(() => /from-sql \{[^}]*"from":"sql"/.test(document.getElementById('log').textContent), null, { timeout: WAIT })

  // A broadcast sent from the page's form comes back (self: true) and is acknowledged.
  step = 'send from the page'
  await page.fill('#event', 'from-page')
  await page.fill('#payload', '{"n": 42}')
  await page.click('#send-button')
  await page.waitForFunction(() => document.getElementById('send-result').textContent === 'sent: ok', null, { timeout: WAIT })
  await page.waitForFunction(() => document.getElementById('log').textContent.includes('from-page {"n":42}'), null, { timeout: WAIT })

  // Presence: the page's own member, and the connection count from the status endpoint.
  step = 'see presence and the connection count'
  await page.waitForFunction(() => document.getElementById('members').textContent.includes('inspector-test'), null, { timeout: WAIT })
  await page.waitForFunction(() => /connections: [1-9]/.test(document.getElementById('connections').textContent), null, { timeout: WAIT })

  // Private topic without a read policy: the refusal reason the server sent is shown.
  step = 'see the refusal of the private join'
  await page.check('#private')
  await page.fill('#topic', PRIVATE_TOPIC)
  await page.fill('#presence-key', '')
  await page.click('#join')
  const expected = `Unauthorized: You do not have permissions to read from this Channel topic: ${PRIVATE_TOPIC}`
  await page.waitForFunction((text) => {
    const e = document.getElementById('error')
    return !e.hidden && e.textContent.includes(text)
  }, expected, { timeout: WAIT })

  mkdirSync(dirname(SCREENSHOT), { recursive: true })
  await page.screenshot({ path: SCREENSHOT, fullPage: true })

  if (offHost.length > 0) throw new Error(`the page asked other hosts: ${offHost.join(', ')}`)
  // A refused join is logged by nobody; any other console error is a bug of the page.
  if (consoleErrors.length > 0) throw new Error(`console errors: ${consoleErrors.join(' | ')}`)
  console.log(`inspector: ok (screenshot ${SCREENSHOT})`)
} catch (e) {
  // What the page showed when it failed, for the test's output.
  const page = browser.contexts()[0]?.pages()[0]
  const shown = page
    ? await page.evaluate(() => ['state', 'error', 'connections', 'send-result', 'members', 'log']
      .map((id) => `${id}: ${document.getElementById(id).textContent.slice(0, 2000)}`).join('\n')).catch((x) => String(x))
    : 'no page'
  console.error(`inspector: failed at "${step}"\n${shown}\nconsole: ${consoleErrors.join(' | ')}`)
  if (page) await page.screenshot({ path: SCREENSHOT, fullPage: true }).catch(() => {})
  throw e
} finally {
  await browser.close()
  await db.end()
}
