"""Deleting a session, whatever words the server has for "there is none" (every dialect).

A delete is done once the session is gone, whether this call removed it or it was gone
already. Each dialect reads its own server's "not found" answers (``delete_session`` returns
False); what a dialect does not know as such reaches here as a refusal (``PermanentError``):

* ``404``, or ``400``/``422`` whose text says the session is not found: gone already;
* another ``400``/``422``: gone already when the server's own ``GET`` of that name says there
  is none (WAHA Core refuses the delete of any session but ``default`` with a 422 about its
  tier, while its ``GET /api/sessions/{name}`` answers 404). Servers whose sessions cannot be
  read back (fazer) are not asked; their refusal stands.

Anything else (401/403, a retryable error, a refusal of a session that is there) is raised.
"""

from __future__ import annotations

from zapbus.dialects.base import Dialect
from zapbus.dialects.errors import BaileysError, PermanentError
from zapbus.dialects.http import NOT_FOUND

_REFUSALS = (400, 422)


async def delete_or_gone(dialect: Dialect, name: str, phone_number: str | None) -> bool:
    """Delete the session ``name``: True if this call removed it, False if there was none
    (said by a 404, by a refusal meaning "not found", or by the server's GET of that name)."""
    try:
        return await dialect.delete_session_of(name, phone_number)
    except PermanentError as exc:
        if exc.status == 404 or (exc.status in _REFUSALS and NOT_FOUND.search(exc.reason)):
            return False
        if exc.status not in _REFUSALS or not dialect.observable:
            raise
        try:
            there = await dialect.get_session(name)
        except BaileysError:
            raise exc from None  # cannot tell: the refusal stands
        if there is not None:
            raise
        return False
