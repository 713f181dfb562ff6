"""The run folder's lock: one `dpop run` at a time works on a run folder."""
import time
from datetime import datetime, timezone

from pipeline import storage
from pipeline.vocab import PlanError


class RunLock:
    """`{run}/_lock.json` while a `dpop run` works on a run folder, so a second run (a job submitted twice) refuses
    at once instead of both writing the same stages.

    The file names its holder (host, pid, process start time, start and heartbeat times). A lock is taken over when
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

    def _write(self) -> None:
        storage.write_json(self.uri, {**self.holder, "heartbeat": time.time()})

    def __enter__(self):
        import threading

        held = storage.read_json(self.uri)
        if held and self.holder_is_alive(held):
            raise PlanError(f"run folder {self.uri.rsplit('/', 1)[0]} is in use by another dpop run: host "
                            f"{held['host']}, pid {held['pid']}, started {held['started_at']} (lock {self.uri}); "
                            f"wait for it, or stop it")
        if held:
            print(f"[dpop] taking over the lock of a dead run (host {held['host']}, pid {held['pid']}, started "
                  f"{held['started_at']})", flush=True)
        self._write()
        written = storage.read_json(self.uri) or {}
        if (written.get("host"), written.get("pid")) != (self.holder["host"], self.holder["pid"]):
            raise PlanError(f"run folder {self.uri.rsplit('/', 1)[0]} was taken by another dpop run starting at the "
                            f"same time: host {written.get('host')}, pid {written.get('pid')}")
        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(self.HEARTBEAT_SECONDS):
                self._write()

        threading.Thread(target=beat, name="dpop-run-lock", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        fs, path = storage.resolve(self.uri)
        fs.delete_file(path)
        return False
