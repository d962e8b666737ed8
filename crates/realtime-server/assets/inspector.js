// The inspector page: one supabase-js client against this server, one channel at a time.
// Everything is rendered with textContent: topics, payloads and refusal reasons are data.
'use strict'
;(() => {
  const $ = (id) => document.getElementById(id)
  let client = null
  let channel = null
  let statusTimer = null

  function token() {
    return $('token').value.trim()
  }

  function setState(text) {
    $('state').textContent = text
  }

  function showError(text) {
    $('error').hidden = !text
    $('error').textContent = text || ''
  }

  function log(kind, text) {
    const li = document.createElement('li')
    li.className = kind
    const time = document.createElement('time')
    time.textContent = new Date().toLocaleTimeString()
    const tag = document.createElement('b')
    tag.textContent = kind
    const body = document.createElement('code')
    body.textContent = text
    li.append(time, ' ', tag, ' ', body)
    $('log').prepend(li)
    // Bounded, so a busy topic cannot make the page grow without end.
    while ($('log').children.length > 500) $('log').lastElementChild.remove()
  }

  function showMembers(state) {
    const list = $('members')
    list.replaceChildren()
    const keys = Object.keys(state || {})
    if (keys.length === 0) {
      const li = document.createElement('li')
      li.className = 'empty'
      li.textContent = 'nobody'
      list.append(li)
    }
    for (const key of keys.sort()) {
      const li = document.createElement('li')
      const metas = state[key].map(({ presence_ref, ...meta }) => meta)
      li.textContent = `${key} ${JSON.stringify(metas)}`
      list.append(li)
    }
  }

  // Join stays enabled: joining another topic leaves the current one first.
  function joined(yes) {
    $('leave').disabled = !yes
    $('send-button').disabled = !yes
  }

  // The connection count, asked with the pasted token (the server answers holders of a valid
  // token only).
  async function refreshStatus() {
    const t = token()
    if (!t) return
    try {
      const r = await fetch('/inspector/status', { headers: { Authorization: `Bearer ${t}` }, cache: 'no-store' })
      const body = await r.json()
      $('connections').textContent = r.ok
        ? `connections: ${body.connections} · channels: ${body.channels}`
        : `connections: ? (${body.error || r.status})`
    } catch (e) {
      $('connections').textContent = `connections: ? (${e.message})`
    }
  }

  // Forgets the channel before removing it: removing it calls its subscribe callback again
  // (CLOSED), which must then see that the channel is no longer the page's.
  async function leave() {
    const [ch, c] = [channel, client]
    channel = null
    client = null
    if (ch && c) await c.removeChannel(ch)
    if (c) c.realtime.disconnect()
    joined(false)
    setState('not joined')
    showMembers({})
  }

  async function join() {
    await leave()
    showError('')
    const t = token()
    const topic = $('topic').value.trim()
    if (!t || !topic) {
      showError('A token and a topic are needed.')
      return
    }
    const isPrivate = $('private').checked
    const presenceKey = $('presence-key').value.trim()
    client = supabase.createClient(window.location.origin, t, {
      auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
    })
    client.realtime.setAuth(t)
    const config = { private: isPrivate, broadcast: { self: true, ack: true } }
    if (presenceKey) config.presence = { key: presenceKey, enabled: true }
    const ch = client.channel(topic, { config })
    channel = ch
    ch.on('broadcast', { event: '*' }, (m) => log('broadcast', `${m.event} ${JSON.stringify(m.payload)}`))
    ch.on('presence', { event: 'sync' }, () => showMembers(ch.presenceState()))
    ch.on('presence', { event: 'join' }, ({ key }) => log('presence', `join ${key}`))
    ch.on('presence', { event: 'leave' }, ({ key }) => log('presence', `leave ${key}`))
    setState(`joining ${isPrivate ? 'private' : 'public'} ${topic}...`)
    ch.subscribe(async (status, err) => {
      if (ch !== channel) return
      if (status === 'SUBSCRIBED') {
        joined(true)
        setState(`joined ${isPrivate ? 'private' : 'public'} ${topic}`)
        log('system', `joined ${topic}`)
        if (presenceKey) await ch.track({ online_at: new Date().toISOString() })
        refreshStatus()
        return
      }
      // The server's reason is the error reply's text; realtime-js puts it in the message.
      const reason = (err && err.cause && err.cause.reason) || (err && err.message) || ''
      log('error', `${status} ${reason}`)
      // realtime-js would retry the join forever: stop, the reason will not change by itself.
      await leave()
      setState(status)
      showError(`Join refused${reason ? ': ' + reason : ` (${status})`}`)
    })
  }

  async function send() {
    if (!channel) return
    let payload
    try {
      payload = JSON.parse($('payload').value)
    } catch (e) {
      $('send-result').textContent = `not JSON: ${e.message}`
      return
    }
    if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
      $('send-result').textContent = 'the payload must be a JSON object'
      return
    }
    const result = await channel.send({ type: 'broadcast', event: $('event').value, payload })
    $('send-result').textContent = `sent: ${result}`
  }

  $('join').addEventListener('click', join)
  $('leave').addEventListener('click', leave)
  $('send-button').addEventListener('click', send)
  $('clear').addEventListener('click', () => $('log').replaceChildren())
  $('token').addEventListener('change', refreshStatus)
  statusTimer = setInterval(refreshStatus, 2000)
  window.addEventListener('beforeunload', () => clearInterval(statusTimer))
})()
