"""The encrypted token vault: one file per account, tokens sealed with AES-GCM under a random
data key, the data key wrapped in key slots as disk encryption does it.

* A password slot wraps the data key under scrypt(password): an account may have several local
  passwords (one per client or device), and one changes without re-authorizing.
* A master slot wraps it under a key from ``[vault] master_key``; with it the daemon opens every
  vault at start-up and refreshes in the background before any client logs in.
* Without a master key an account's vault opens at its first successful client login; the data
  key then stays in this process's memory only.

The vault is a ``TokenStore``: the token manager reads and writes through it and sees a locked
account as ``TokenState(locked=True)``. Only the tokens are secret; the rest of the state
(expiry, last refresh, errors, notifications) stays readable without a key, for ``status``.

Modules: ``format`` (the file's JSON, slots, sealing; pure), ``files`` (reading, writing and
slot edits; blocking), ``unlock`` (the daemon's password check and its cache), ``migrate`` (the
earlier plain store), ``vault`` (``Vault``, all of these joined), ``policy`` (what the commands
do to a vault).
"""

from .errors import PasswordNeeded, VaultBusy, VaultError, VaultLocked
from .format import SlotInfo
from .vault import Vault

__all__ = ["PasswordNeeded", "SlotInfo", "Vault", "VaultBusy", "VaultError", "VaultLocked"]
