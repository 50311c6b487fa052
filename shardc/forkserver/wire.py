"""The messages between a pool and its fork server (see :mod:`shardc.forkserver`)."""

SPAWN, SPAWNED, SPAWN_FAILED, EXITED, STOP, READY = "spawn", "spawned", "spawn_failed", "exited", "stop", "ready"
