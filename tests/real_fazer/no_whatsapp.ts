// Preloaded into the real fazer-ai/baileys-api by tests/test_real_fazer.py (bun --preload):
// WhatsApp's names never resolve, so Baileys fails the same real way on every machine
// (getaddrinfo ENOTFOUND), whether or not this one can reach WhatsApp. Nothing else changes.
import dns from "node:dns";

const WHATSAPP = /(^|\.)whatsapp\.(com|net)$/i;
const blocked = (host: unknown): host is string => typeof host === "string" && WHATSAPP.test(host);

function notFound(host: string): Error {
  const error = new Error(`getaddrinfo ENOTFOUND ${host}`) as NodeJS.ErrnoException;
  error.code = "ENOTFOUND";
  return error;
}

const lookup = dns.lookup as (...args: unknown[]) => unknown;
(dns as { lookup: unknown }).lookup = (host: unknown, ...rest: unknown[]) => {
  if (!blocked(host)) return lookup(host, ...rest);
  const callback = rest[rest.length - 1] as (error: Error) => void;
  process.nextTick(callback, notFound(host));
};

const lookupAsync = dns.promises.lookup as (...args: unknown[]) => Promise<unknown>;
(dns.promises as { lookup: unknown }).lookup = (host: unknown, ...rest: unknown[]) =>
  blocked(host) ? Promise.reject(notFound(host)) : lookupAsync(host, ...rest);
