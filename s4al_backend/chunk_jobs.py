"""A cycle's pool scoring and prediction pushing spread over free RQ workers (worker mode).

The cycle's job (`RedisChunks.run`) puts its chunks (`pool_chunks`: the items of each, and a
header with the version, the label map and the acquisition settings) in Redis under
`s4al:<queue>:p<project>:chunks:<job id>:`, with a `todo` list of their indices, and
queues helper jobs (`run_chunks_job`) for the other workers: first on
`<QUEUE_NAME>-chunks-gpu`, which only GPU workers take, one per GPU worker; then on
`<QUEUE_NAME>-chunks` for the rest, at most CHUNK_HELPERS in all. Workers take chunk
queues before cycles (`worker_queues`). Every process, the cycle's own included, then
pulls chunks from `todo` until it is empty, so a fast worker does more of them and none
waits for a worker that is busy: a helper that starts late finds nothing left and ends.

A chunk is claimed atomically with its removal from `todo` (`claim:<i>`, a TTL renewed
while it runs, as the project lock is); its result goes to `result:<i>`. The cycle
finishes when every chunk has a result: a chunk whose claim expired (its worker died) or
whose helper failed (`error:<i>`) is run again by the cycle itself, skipping the tasks
helpers already pushed to (`pushed`), so no task gets a version's prediction twice.
Helpers count their images and predictions in `counts`, which the cycle adds to its own
for /status.

Helpers score with the version from the shared MODEL_DIR and fetch images into their
own cache; the settings that shape the selection come from the header, not their
environment (`acquire.SHARED_SETTINGS`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence

from .acquire import ChunkScorer, LocalChunks, Tally
from .locks import RedisLock
from .pool_chunks import ChunkResult, spec_item, spec_label_map
from .settings import Settings

log = logging.getLogger(__name__)

HELPER_FUNCTION = "s4al_backend.chunk_jobs.run_chunks_job"
CLAIM_TTL = 60.0  # seconds a dead worker's chunk stays claimed
POLL_S = 0.5  # the cycle's wait for other workers' chunks
HELPER_QUEUED_TTL = 900  # a helper job not started by then is dropped by RQ
KEPT_S = 3600  # a helper's result and error, for the cycle to read

# pop the next index off KEYS[1] and claim it: ARGV[1] .. index = ARGV[2] for ARGV[3] ms
_CLAIM = """
local index = redis.call('lpop', KEYS[1])
if index then redis.call('set', ARGV[1] .. index, ARGV[2], 'PX', tonumber(ARGV[3])) end
return index
"""


def chunk_queues(queue_name: str) -> tuple[str, str]:
    """The GPU workers' chunk queue and everyone's."""
    return f"{queue_name}-chunks-gpu", f"{queue_name}-chunks"


def worker_queues(queue_name: str, device: str) -> list[str]:
    """What a worker listens to, in order: chunk queues (its GPU one first) before cycles,
    so a free worker helps a running cycle before it starts another."""
    gpu, everyone = chunk_queues(queue_name)
    return [*([gpu] if device.startswith("cuda") else []), everyone, queue_name]


def chunk_runner(settings: Settings, project: int):
    """`RedisChunks` inside an RQ job with CHUNK_HELPERS > 0, else `LocalChunks`."""
    if not settings.redis_url or settings.chunk_helpers <= 0:
        return LocalChunks()
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        return LocalChunks()
    return RedisChunks(job.connection, settings, project, job.id, job.worker_name)


@dataclasses.dataclass(frozen=True)
class ChunkKeys:
    prefix: str  # s4al:<queue>:p<project>:chunks:<job id>:

    @classmethod
    def of(cls, queue: str, project: int, job_id: str) -> ChunkKeys:
        return cls(f"s4al:{queue}:p{project}:chunks:{job_id}:")

    @property
    def header(self) -> str:
        return self.prefix + "header"

    @property
    def todo(self) -> str:
        return self.prefix + "todo"

    @property
    def counts(self) -> str:
        return self.prefix + "counts"

    @property
    def pushed(self) -> str:  # the tasks helpers pushed a prediction to
        return self.prefix + "pushed"

    def one(self, kind: str, index: int) -> str:  # spec, result, claim, error
        return f"{self.prefix}{kind}:{index}"


def claim_next(connection, keys: ChunkKeys, token: str) -> int | None:
    """The next chunk nobody took, now claimed by `token`; None when none is left."""
    index = connection.eval(_CLAIM, 1, keys.todo, keys.prefix + "claim:", token,
                            int(CLAIM_TTL * 1000))
    return None if index is None else int(index)


class RemoteTally:
    """A helper's counts, added up in Redis for the cycle's /status."""

    def __init__(self, connection, keys: ChunkKeys):
        self.connection, self.keys = connection, keys

    def add(self, scored: int = 0, pushed: int = 0, tasks: Sequence[int] = ()) -> None:
        pipe = self.connection.pipeline()
        if scored:
            pipe.hincrby(self.keys.counts, "scored", scored)
        if pushed:
            pipe.hincrby(self.keys.counts, "pushed", pushed)
        if tasks:
            pipe.sadd(self.keys.pushed, *tasks)
        pipe.execute()


class RedisChunks:
    """The cycle's side: publish the chunks, call helpers, work and wait (module doc)."""

    def __init__(self, connection, settings: Settings, project: int, job_id: str,
                 worker: str | None = None):
        self.connection, self.settings, self.project = connection, settings, project
        self.worker = worker  # the cycle's own worker, which helps nobody meanwhile
        self.keys = ChunkKeys.of(settings.queue_name, project, job_id)
        self.token = f"{job_id}:{uuid.uuid4().hex[:8]}"
        self.ttl = int(settings.job_timeout)

    def run(self, ranges: list[tuple[int, int]], work: Callable[[int], ChunkResult],
            spec: Callable[[int], dict], header: dict, tally: Tally) -> list[ChunkResult]:
        count = len(ranges)
        helpers = self.helper_queues(count - 1)
        if not helpers:
            return LocalChunks().run(ranges, work, spec, header, tally)
        self.publish(count, spec, header)
        try:
            self.call_helpers(helpers)
            results: dict[int, ChunkResult] = {}
            while (index := claim_next(self.connection, self.keys, self.token)) is not None:
                results[index] = self.work_claimed(index, work)
                self.sync(tally)
            self.wait(count, results, work, tally)
        finally:
            self.cleanup(count)
        return [results[index] for index in range(count)]

    def publish(self, count: int, spec: Callable[[int], dict], header: dict) -> None:
        pipe = self.connection.pipeline()
        pipe.set(self.keys.header, json.dumps(header), ex=self.ttl)
        for index in range(count):
            pipe.set(self.keys.one("spec", index), json.dumps(spec(index)), ex=self.ttl)
        pipe.rpush(self.keys.todo, *range(count))
        pipe.expire(self.keys.todo, self.ttl)
        pipe.execute()

    def helper_queues(self, most: int) -> list[str]:
        """One queue name per helper job: the GPU workers' queue for each other GPU
        worker, then everyone's for the other workers, CHUNK_HELPERS and `most` at most;
        none without other workers. Busy ones count too: one that frees up while the
        chunks last takes its helper job then."""
        from rq import Worker

        gpu_queue, everyone = chunk_queues(self.settings.queue_name)
        gpu = cpu = 0
        for worker in Worker.all(connection=self.connection):
            names = worker.queue_names()
            if worker.name == self.worker:
                continue
            gpu += gpu_queue in names
            cpu += everyone in names and gpu_queue not in names
        planned = [gpu_queue] * gpu + [everyone] * cpu
        return planned[:max(0, min(most, int(self.settings.chunk_helpers)))]

    def call_helpers(self, queues: list[str]) -> None:
        from rq import Queue

        for name in queues:
            Queue(name, connection=self.connection).enqueue(
                HELPER_FUNCTION, self.keys.prefix, job_timeout=self.settings.job_timeout,
                ttl=HELPER_QUEUED_TTL, result_ttl=3600, failure_ttl=3600,
                description=f"s4al chunks, project {self.project}")
        log.info("project %s: %d helper jobs queued for the pool's chunks (%s)",
                 self.project, len(queues), ", ".join(sorted(set(queues))))

    def work_claimed(self, index: int, work: Callable[[int], ChunkResult]) -> ChunkResult:
        lock = RedisLock(self.connection, self.keys.one("claim", index), self.token, CLAIM_TTL)
        lock.hold()
        try:
            return work(index)
        finally:
            lock.release()

    def sync(self, tally: Tally) -> None:
        scored, pushed = self.connection.hmget(self.keys.counts, "scored", "pushed")
        tally.remote(int(scored or 0), int(pushed or 0))

    def wait(self, count: int, results: dict[int, ChunkResult],
             work: Callable[[int], ChunkResult], tally: Tally) -> None:
        """Until every chunk has a result; a chunk left by a dead or failed helper is run
        here."""
        while len(results) < count:
            for index in [i for i in range(count) if i not in results]:
                raw = self.connection.get(self.keys.one("result", index))
                if raw is not None:
                    results[index] = ChunkResult.from_json(raw)
                elif self.abandoned(index):
                    results[index] = self.take_over(index, work)
            self.sync(tally)
            if len(results) < count:
                time.sleep(POLL_S)

    def abandoned(self, index: int) -> bool:
        """No live claim and still no result (checked after the claim: a helper stores
        its result before it lets go)."""
        if self.connection.exists(self.keys.one("claim", index)):
            return False
        return self.connection.get(self.keys.one("result", index)) is None

    def take_over(self, index: int, work: Callable[..., ChunkResult]) -> ChunkResult:
        """Run a chunk another worker left, skipping the tasks it already pushed to."""
        error = self.connection.get(self.keys.one("error", index))
        log.warning("project %s: chunk %d %s; this cycle runs it", self.project, index,
                    f"failed on a helper ({error.decode()})" if error
                    else "lost its worker (claim expired)")
        self.connection.set(self.keys.one("claim", index), self.token,
                            px=int(CLAIM_TTL * 1000))
        done = {int(task) for task in self.connection.smembers(self.keys.pushed)}
        return self.work_claimed(index, lambda i: work(i, done))

    def cleanup(self, count: int) -> None:
        keys = [self.keys.header, self.keys.todo, self.keys.counts, self.keys.pushed]
        for index in range(count):
            keys += [self.keys.one(kind, index) for kind in ("spec", "result", "error")]
        self.connection.delete(*keys)


def run_chunks_job(prefix: str) -> dict:
    """The helper RQ job: pull and run chunks of a running cycle until none is left."""
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        raise RuntimeError("run_chunks_job runs inside an RQ worker")
    connection, keys = job.connection, ChunkKeys(prefix)
    token = f"{job.id}:{uuid.uuid4().hex[:8]}"
    helper: ChunkHelper | None = None
    done = 0
    while (raw := connection.get(keys.header)) is not None:
        index = claim_next(connection, keys, token)
        if index is None:
            break
        lock = RedisLock(connection, keys.one("claim", index), token, CLAIM_TTL)
        lock.hold()
        try:
            helper = helper or ChunkHelper(json.loads(raw))
            spec = json.loads(connection.get(keys.one("spec", index)))
            result = helper.run(spec, RemoteTally(connection, keys))
            connection.set(keys.one("result", index), result.to_json(), ex=KEPT_S)
            done += 1
        except Exception as exc:  # the cycle runs it itself (RedisChunks.take_over)
            log.exception("chunk %d of %s failed", index, prefix)
            connection.set(keys.one("error", index), f"{type(exc).__name__}: {exc}",
                           ex=KEPT_S)
            break
        finally:
            lock.release()
    return {"chunks": done}


class ChunkHelper:
    """A helper's scorer for one cycle: its version's networks from the shared MODEL_DIR,
    this worker's device, image cache and Label Studio client."""

    def __init__(self, header: dict):
        from . import store as store_module
        from .images import ImageFetcher
        from .pool_images import PoolImages
        from .studio import Studio

        own = Settings.from_env()
        settings = dataclasses.replace(own, **header["settings"])
        project, version = int(header["project"]), header["version"]
        store = store_module.project_store(settings.model_dir, project, settings.keep_versions)
        student, served, state = store.networks(version, settings.resolve_device())
        self.images = PoolImages(ImageFetcher(settings))
        self.scorer = ChunkScorer(settings, Studio.from_settings(settings), project,
                                  spec_label_map(header["label_map"]), student, served,
                                  version, bool(header["selecting"]), state)
        log.info("helping project %s's cycle: version %s on %s", project, version,
                 self.scorer.device)

    def run(self, spec: dict, tally) -> ChunkResult:
        items = [spec_item(item) for item in spec["items"]]
        failures: list[str] = []
        self.images.prepare(items, lambda item, exc: failures.append(f"task {item.id}: {exc}"))
        if failures:
            raise RuntimeError(f"{len(failures)} images not loaded, first {failures[0]}")
        return self.scorer.score(items, int(spec["offset"]), set(spec["have"]), tally)
