"""The run folder's lock: one `dpop run` at a time works on a run folder."""
import json
import time
from datetime import datetime, timezone

from pipeline import storage
from pipeline.vocab import PlanError


class RunLock:
    """`{run}/_lock.json` while a `dpop run` works on a run folder, so a second run (a job submitted twice) refuses
    at once instead of both writing the same stages.

    The file is created atomically where it lives (storage.create_exclusive: a hard link locally, a conditional PUT
    on S3), so of two runs that start together exactly one holds it. It names its holder (host, pid, process start
    time, start and heartbeat times), and only its holder removes it. A lock is taken over when
    its holder is dead: on the same host, when that process no longer exists (or its pid now belongs to a newer
    process); from another host, when its heartbeat, refreshed every HEARTBEAT_SECONDS, is older than STALE_SECONDS.
    """
    HEARTBEAT_SECONDS = 30
    STALE_SECONDS = 300

    def __init__(self, run_uri: str):
        import socket

        import psutil

        self.uri = storage.join(run_uri, "_lock.json")
        me = psutil.Process()
        self.holder = {"host": socket.gethostname(), "pid": me.pid, "process_started": me.create_time(),
                       "started_at": datetime.now(timezone.utc).isoformat()}
        self._stop = None

    @staticmethod
    def holder_is_alive(holder: dict) -> bool:
        import socket

        import psutil

        if holder.get("host") != socket.gethostname():
            return time.time() - holder.get("heartbeat", 0) < RunLock.STALE_SECONDS
        try:
            return abs(psutil.Process(holder["pid"]).create_time() - holder["process_started"]) < 1
        except (psutil.NoSuchProcess, KeyError):
            return False

    def _content(self) -> str:
        return json.dumps({**self.holder, "heartbeat": time.time()}, indent=2, sort_keys=True) + "\n"

    def _is_mine(self, held: dict | None) -> bool:
        return bool(held) and all(held.get(k) == self.holder[k] for k in ("host", "pid", "process_started"))

    def __enter__(self):
        import threading

        folder = self.uri.rsplit("/", 1)[0]
        # Created atomically where it lives (storage.create_exclusive): of two runs that start together, one
        # creates the file and the other finds it. Read back as well: an S3-compatible store that ignores
        # `If-None-Match` lets both writes succeed, and then only the last writer's name is in the file.
        while True:
            if storage.create_exclusive(self.uri, self._content()) and self._is_mine(storage.read_json(self.uri)):
                break
            held = storage.read_json(self.uri)
            if held is None:
                continue  # released between the two calls: try again
            if self.holder_is_alive(held):
                raise PlanError(f"run folder {folder} is in use by another dpop run: host {held['host']}, pid "
                                f"{held['pid']}, started {held['started_at']} (lock {self.uri}); wait for it, or "
                                f"stop it")
            print(f"[dpop] taking over the lock of a dead run (host {held['host']}, pid {held['pid']}, started "
                  f"{held['started_at']})", flush=True)
            if storage.read_json(self.uri) == held:  # not already taken over by another run
                storage.delete_file(self.uri)
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="dpop-run-lock", daemon=True).start()
        return self

    def _beat(self) -> None:
        """Refresh the heartbeat every HEARTBEAT_SECONDS. A failed write is retried at the next beat, with a warning:
        a lock whose heartbeat stops for STALE_SECONDS may be taken over by a run on another host."""
        failing_since = None
        while not self._stop.wait(self.HEARTBEAT_SECONDS):
            try:
                storage.write_text(self.uri, self._content())
                failing_since = None
            except Exception as error:  # noqa: BLE001 (any storage error: keep beating)
                failing_since = failing_since or time.time()
                print(f"[dpop] warning: could not refresh the run lock {self.uri} for "
                      f"{time.time() - failing_since:.0f} s ({type(error).__name__}: {error}); another host may take "
                      f"the run folder over after {self.STALE_SECONDS} s", flush=True)

    def __exit__(self, *exc):
        self._stop.set()
        held = storage.read_json(self.uri)
        if self._is_mine(held):
            storage.delete_file(self.uri)
        elif held:
            print(f"[dpop] warning: the run lock {self.uri} now names another run (host {held.get('host')}, pid "
                  f"{held.get('pid')}): left in place", flush=True)
        return False
