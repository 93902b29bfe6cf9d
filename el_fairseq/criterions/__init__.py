"""The fairseq criteria. Importing them loads the plugin: the criteria are registered with fairseq and
el_fairseq.compat's patches applied (fairseq does this through --user-dir)."""
from .. import compat
from . import spawned_worker

compat.apply(spawn_worker=spawned_worker.run)

from . import encouraging_loss  # noqa: F401,E402
