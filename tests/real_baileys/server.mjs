// A small seed-dialect server around real Baileys, for tests/test_real_baileys.py.
//
// It speaks the dialect zapbus/dialects/seed.py expects:
//   POST   /sessions {name, webhookUrl}   201, 409 if the name is taken
//   GET    /sessions                      {"success": true, "data": [{name, status}]}
//   GET    /sessions/{name}               404 if none
//   DELETE /sessions/{name}               ends the socket; 404 if none
//   POST   /sessions/{name}/pairing-code {phoneNumber}  Baileys' requestPairingCode
//   GET    /health
// Every route but /health needs the header X-API-Key equal to $SEED_API_KEY. Bodies are
// {"success": true, "data": ...} or {"success": false, "error": "..."}.
//
// Each Baileys `connection.update` is forwarded, in order, to the session's webhookUrl as
// {"event": "connection.update", "session": name, "data": <the update>} in Baileys' own shape;
// lastDisconnect.error (a Boom) is serialized as {message, output: {statusCode, payload}}.
// A close that is not loggedOut makes a new socket after RECONNECT_DELAY_MS, as real servers do,
// so a WhatsApp that cannot be reached shows as "close, connecting, close ..." forever.
//
// Only Node's built-in modules and `baileys`. Environment: PORT (0 = any free port; the port
// is printed as one JSON line {"listening": port} on stdout), HOST (127.0.0.1), SEED_API_KEY
// (required), RECONNECT_DELAY_MS (1000), WA_WEBSOCKET_URL (Baileys' waWebSocketUrl; its default,
// wss://web.whatsapp.com/ws/chat, when unset), BAILEYS_LOG_LEVEL (error; Baileys' logs go to
// stderr, with one JSON line per webhook delivered).

import { mkdtemp, rm } from 'node:fs/promises'
import http from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import makeWASocket, { DisconnectReason, useMultiFileAuthState } from 'baileys'

const API_KEY = process.env.SEED_API_KEY
if (!API_KEY) {
  console.error('SEED_API_KEY must be set')
  process.exit(2)
}
const HOST = process.env.HOST || '127.0.0.1'
const PORT = Number(process.env.PORT || 0)
const RECONNECT_DELAY_MS = Number(process.env.RECONNECT_DELAY_MS || 1000)
const MAX_BODY = 64 * 1024

// Baileys wants a pino-like logger; keep its chatter off stdout (stdout carries the port line).
const LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal']
const LOG_LEVEL = process.env.BAILEYS_LOG_LEVEL || 'error'
function makeLogger(bindings = {}) {
  const logger = { level: LOG_LEVEL, child: (more) => makeLogger({ ...bindings, ...more }) }
  for (const level of LEVELS) {
    logger[level] = (obj, msg) => {
      if (LEVELS.indexOf(level) < LEVELS.indexOf(logger.level)) return
      const text = typeof obj === 'string' ? obj : msg || ''
      const extra = typeof obj === 'object' && obj !== null ? safeJson(obj) : ''
      process.stderr.write(`[baileys ${level}] ${safeJson(bindings)} ${text} ${extra}\n`)
    }
  }
  return logger
}

function safeJson(value) {
  try {
    return JSON.stringify(value)
  } catch {
    return String(value)
  }
}

function log(message, fields = {}) {
  process.stderr.write(`${safeJson({ t: new Date().toISOString(), message, ...fields })}\n`)
}

/** name -> {name, webhookUrl, status, qr, sock, authDir, deleted, timer, deliveries, epoch} */
const sessions = new Map()

// --- webhooks --------------------------------------------------------------------------------

function serializeError(error) {
  if (!error) return undefined
  const out = { message: error.message }
  if (error.output) {
    out.output = { statusCode: error.output.statusCode, payload: error.output.payload }
  }
  if (error.data !== undefined && error.data !== null) {
    try {
      out.data = JSON.parse(safeJson(error.data))
    } catch {
      // not serializable: leave it out
    }
  }
  return out
}

function serializeUpdate(update) {
  const data = { ...update }
  if (update.lastDisconnect) {
    data.lastDisconnect = {
      error: serializeError(update.lastDisconnect.error),
      date: update.lastDisconnect.date
    }
  }
  return data
}

/** Deliver one webhook, a few tries; deliveries of a session are chained to keep their order. */
function forward(session, body) {
  const payload = JSON.stringify(body)
  session.deliveries = session.deliveries.then(async () => {
    for (let attempt = 1; attempt <= 5; attempt++) {
      try {
        const res = await fetch(session.webhookUrl, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: payload,
          signal: AbortSignal.timeout(5000)
        })
        await res.arrayBuffer()
        log('webhook delivered', { session: session.name, status: res.status, body })
        if (res.status < 500) return
      } catch (error) {
        log('webhook failed', { session: session.name, attempt, error: String(error) })
      }
      await new Promise((resolve) => setTimeout(resolve, 200 * attempt))
    }
  })
}

// --- Baileys sockets --------------------------------------------------------------------------

async function connect(session) {
  if (session.deleted) return
  const { state, saveCreds } = await useMultiFileAuthState(session.authDir)
  if (session.deleted) return
  const epoch = ++session.epoch
  const sock = makeWASocket({
    auth: state,
    logger: makeLogger({ session: session.name }),
    printQRInTerminal: false,
    markOnlineOnConnect: false,
    syncFullHistory: false,
    ...(process.env.WA_WEBSOCKET_URL ? { waWebSocketUrl: process.env.WA_WEBSOCKET_URL } : {})
  })
  session.sock = sock
  sock.ev.on('creds.update', saveCreds)
  sock.ev.on('connection.update', (update) => {
    if (session.deleted || epoch !== session.epoch) return
    if (update.connection) session.status = update.connection
    if (update.qr) session.qr = update.qr
    forward(session, { event: 'connection.update', session: session.name, data: serializeUpdate(update) })
    if (update.connection === 'close') {
      const code = update.lastDisconnect?.error?.output?.statusCode
      if (code === DisconnectReason.loggedOut) {
        session.status = 'logged_out'
        return
      }
      session.timer = setTimeout(() => {
        session.timer = undefined
        connect(session).catch((error) => log('reconnect failed', { session: session.name, error: String(error) }))
      }, RECONNECT_DELAY_MS)
    }
  })
}

async function createSession(name, webhookUrl) {
  const session = {
    name,
    webhookUrl,
    status: 'connecting',
    qr: undefined,
    sock: undefined,
    authDir: await mkdtemp(join(tmpdir(), 'zapbus-baileys-')),
    deleted: false,
    timer: undefined,
    deliveries: Promise.resolve(),
    epoch: 0,
    createdAt: new Date().toISOString()
  }
  sessions.set(name, session)
  await connect(session)
  return session
}

async function deleteSession(session) {
  session.deleted = true
  sessions.delete(session.name)
  if (session.timer) clearTimeout(session.timer)
  try {
    await session.sock?.end(undefined)
  } catch (error) {
    log('end failed', { session: session.name, error: String(error) })
  }
  await rm(session.authDir, { recursive: true, force: true })
}

function describe(session) {
  return { name: session.name, status: session.status, qr: session.qr ?? null, createdAt: session.createdAt }
}

// --- HTTP ------------------------------------------------------------------------------------

function send(res, status, body) {
  const text = JSON.stringify(body)
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) })
  res.end(text)
}

const ok = (res, status, data) => send(res, status, { success: true, data })
const fail = (res, status, error) => send(res, status, { success: false, error })

async function readJson(req) {
  const chunks = []
  let size = 0
  for await (const chunk of req) {
    size += chunk.length
    if (size > MAX_BODY) throw new Error('body too large')
    chunks.push(chunk)
  }
  const text = Buffer.concat(chunks).toString('utf8')
  return text ? JSON.parse(text) : {}
}

async function route(req, res) {
  const url = new URL(req.url, 'http://localhost')
  const parts = url.pathname.split('/').filter(Boolean).map(decodeURIComponent)
  if (req.method === 'GET' && url.pathname === '/health') {
    return ok(res, 200, { status: 'ok', sessions: sessions.size })
  }
  if (req.headers['x-api-key'] !== API_KEY) return fail(res, 401, 'invalid api key')
  if (parts[0] !== 'sessions') return fail(res, 404, 'not found')

  if (parts.length === 1) {
    if (req.method === 'GET') return ok(res, 200, [...sessions.values()].map(describe))
    if (req.method !== 'POST') return fail(res, 405, 'method not allowed')
    let body
    try {
      body = await readJson(req)
    } catch (error) {
      return fail(res, 400, `invalid JSON body: ${error.message}`)
    }
    const { name, webhookUrl } = body ?? {}
    if (typeof name !== 'string' || !name) return fail(res, 400, 'name is required')
    if (typeof webhookUrl !== 'string' || !/^https?:\/\//.test(webhookUrl)) {
      return fail(res, 400, 'webhookUrl must be an http(s) URL')
    }
    if (sessions.has(name)) return fail(res, 409, 'session already exists')
    const session = await createSession(name, webhookUrl)
    log('session created', { session: name })
    return ok(res, 201, describe(session))
  }

  const session = sessions.get(parts[1])
  if (parts.length === 2) {
    if (!session) return fail(res, 404, 'session not found')
    if (req.method === 'GET') return ok(res, 200, describe(session))
    if (req.method === 'DELETE') {
      await deleteSession(session)
      log('session deleted', { session: session.name })
      return ok(res, 200, { name: session.name, deleted: true })
    }
    return fail(res, 405, 'method not allowed')
  }

  if (parts.length === 3 && parts[2] === 'pairing-code' && req.method === 'POST') {
    if (!session) return fail(res, 404, 'session not found')
    let body
    try {
      body = await readJson(req)
    } catch (error) {
      return fail(res, 400, `invalid JSON body: ${error.message}`)
    }
    const phone = String(body?.phoneNumber ?? '').replace(/\D/g, '')
    if (!phone) return fail(res, 400, 'phoneNumber is required')
    try {
      const code = await session.sock.requestPairingCode(phone)
      return ok(res, 200, { code })
    } catch (error) {
      // Baileys' Boom errors carry the status (428 "Connection Closed" before the socket is up)
      return fail(res, error?.output?.statusCode || 500, error?.message || String(error))
    }
  }
  return fail(res, 404, 'not found')
}

const server = http.createServer((req, res) => {
  route(req, res).catch((error) => {
    log('request failed', { method: req.method, url: req.url, error: String(error?.stack || error) })
    if (!res.headersSent) fail(res, 500, String(error?.message || error))
    else res.end()
  })
})

server.listen(PORT, HOST, () => {
  process.stdout.write(`${JSON.stringify({ listening: server.address().port })}\n`)
})

async function shutdown() {
  server.close()
  await Promise.allSettled([...sessions.values()].map(deleteSession))
  process.exit(0)
}
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)
