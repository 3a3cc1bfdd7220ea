"""Many threads on one Encoder: results bit-identical to the serial ones, no deadlock, and a failing
request does not disturb the requests it would have shared a batch with. Streaming and huge inputs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from stableembed import Encoder
from stableembed.runtime.verify import same_bits

THREADS, CALLS = 8, 500


@pytest.fixture(scope="module")
def enc(minilm_artifact):
    return Encoder(minilm_artifact, threads=2, check_hashes=False)


def test_threads_share_batches_without_changing_bits(enc, real_texts) -> None:
    texts = real_texts[:100]
    serial = np.stack([enc.encode(t) for t in texts])

    def worker(k: int) -> tuple[list[str], int]:
        failures, errors_seen = [], 0
        for j in range(CALLS):
            i = (k * 37 + j * 11) % len(texts)
            if j % 50 == 7:  # a bad request among the good ones
                try:
                    enc.encode([texts[i], None])
                except TypeError:
                    errors_seen += 1
                    continue
                failures.append("bad input accepted")
            if j % 3 == 0:
                got = enc.encode([texts[i], texts[(i + 1) % len(texts)]])
                ok = same_bits(got[0], serial[i]).all() and same_bits(got[1], serial[(i + 1) % len(texts)]).all()
            else:
                ok = same_bits(enc.encode(texts[i]), serial[i]).all()
            if not ok:
                failures.append(f"thread {k} call {j} text {i}")
        return failures, errors_seen

    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(worker, k) for k in range(THREADS)]
        results = [f.result(timeout=600) for f in futures]  # a worker's exception surfaces here; a hang times out
    assert [r[0] for r in results] == [[]] * THREADS
    assert [r[1] for r in results] == [CALLS // 50] * THREADS


def test_concurrent_calls_merge_into_shared_backend_runs(minilm_artifact, real_texts) -> None:
    """Flat combining, observed at the backend: while one call's batch runs, the calls that arrive wait,
    and the next run takes all of them at once (one backend run, rows of different token lengths)."""
    enc = Encoder(minilm_artifact, threads=1, check_hashes=False)
    texts = sorted({t for t in real_texts if 0 < len(t) < 120}, key=len)[::6][:6]
    lengths = [len(e.ids) for e in enc.tokenizer.encode(texts)]
    assert len(set(lengths)) > 1, lengths
    serial = enc.encode(texts, batch_size=1)
    inner, runs = enc.backend.run, []
    first_running, release = threading.Event(), threading.Event()

    def run(feeds):
        runs.append(sorted(feeds["attention_mask"].sum(axis=1).tolist()))
        if len(runs) == 1:  # hold the first run: the others queue up behind it
            first_running.set()
            if not release.wait(60):
                raise TimeoutError("never released")
        return inner(feeds)

    enc.backend.run = run
    with ThreadPoolExecutor(len(texts) + 1) as pool:
        first = pool.submit(enc.encode, ["the first call holds the run lock"])
        assert first_running.wait(60)
        others = [pool.submit(enc.encode, [t]) for t in texts]
        deadline = time.monotonic() + 60
        while len(enc._pending) < len(texts):  # every other call has queued its request
            assert time.monotonic() < deadline, "calls did not queue"
            time.sleep(0.005)
        release.set()
        got = np.stack([f.result(60)[0] for f in others])
        first.result(60)
    assert len(runs) == 2, runs  # the held run, then one shared run for all waiting calls
    assert runs[1] == sorted(lengths)
    assert same_bits(got, serial).all()


def _tracking(enc: Encoder, hold: threading.Barrier | None = None, fail_on: int | None = None):
    """Wrap enc.backend.run: count calls and the most in flight at once; optionally wait at `hold` (so
    a run returns only once another is running too) or raise on call number `fail_on`."""
    inner, lock, state = enc.backend.run, threading.Lock(), {"calls": 0, "now": 0, "most": 0}

    def run(feeds):
        with lock:
            state["calls"] += 1
            call = state["calls"]
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            if fail_on == call:
                raise RuntimeError(f"run {call} failed")
            if hold is not None:
                hold.wait(60)  # BrokenBarrierError if no second run ever comes
            return inner(feeds)
        finally:
            with lock:
                state["now"] -= 1

    enc.backend.run = run
    return state


def test_parallel_runs_overlap_and_keep_input_order(minilm_artifact, real_texts) -> None:
    enc = Encoder(minilm_artifact, threads=1, parallel_runs=2, check_hashes=False)
    texts = real_texts[:40]
    serial = Encoder(minilm_artifact, threads=1, check_hashes=False).encode(texts, batch_size=4)
    state = _tracking(enc, hold=threading.Barrier(2))
    got = enc.encode(texts, batch_size=4)  # 10 runs: each waits at the barrier for its partner
    assert state["calls"] == 10 and state["most"] == 2
    assert same_bits(got, serial).all()


def test_parallel_runs_failure_surfaces_and_the_encoder_keeps_working(minilm_artifact, real_texts) -> None:
    enc = Encoder(minilm_artifact, threads=1, parallel_runs=2, check_hashes=False)
    texts = real_texts[:30]
    expected = enc.encode(texts, batch_size=3)
    inner = enc.backend.run
    state = _tracking(enc, fail_on=4)
    with pytest.raises(RuntimeError, match="run 4 failed"):
        enc.encode(texts, batch_size=3)
    assert state["now"] == 0  # no run of the failed call is still going
    enc.backend.run = inner
    assert same_bits(enc.encode(texts, batch_size=3), expected).all()


def test_parallel_runs_arguments(minilm_artifact) -> None:
    import os

    with pytest.raises(ValueError, match="parallel_runs must be >= 1"):
        Encoder(minilm_artifact, parallel_runs=0, check_hashes=False)
    with pytest.raises(ValueError, match="provider 'cpu' only, not 'cuda'"):  # before looking for CUDA
        Encoder(minilm_artifact, provider="cuda", parallel_runs=2, check_hashes=False)
    enc = Encoder(minilm_artifact, parallel_runs=2, check_hashes=False)
    assert enc.threads == max(1, len(os.sched_getaffinity(0)) // 2)
    assert Encoder(minilm_artifact, check_hashes=False).threads is None  # onnxruntime's default


def test_warm_up_runs_as_many_largest_batches_as_parallel_runs(minilm_artifact) -> None:
    enc = Encoder(minilm_artifact, threads=1, parallel_runs=2, check_hashes=False)
    state = _tracking(enc, hold=threading.Barrier(2))
    assert enc.warm_up(32) is not None
    assert state["calls"] == 2 and state["most"] == 2


def test_stream_matches_encode_and_names_global_index(enc, real_texts) -> None:
    texts = real_texts[:50]
    chunks = list(enc.encode_stream(iter(texts), chunk_size=16))
    assert [len(c) for c in chunks] == [16, 16, 16, 2]
    assert same_bits(np.concatenate(chunks), enc.encode(texts)).all()
    with pytest.raises(TypeError, match="index 37"):
        list(enc.encode_stream(iter(texts[:37] + [None]), chunk_size=16))
    with pytest.raises(TypeError, match="not one str"):  # not 5 one-character texts
        enc.encode_stream("hello")
    for size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            enc.encode_stream(texts, chunk_size=size)  # at the call, before any text is read


def test_huge_text_is_tokenized_from_a_prefix(enc, real_texts, monkeypatch) -> None:
    """A million characters: only a prefix of max_length * CUT_RATIO characters, extended to the next
    whitespace (at most twice that), reaches the tokenizer (tokenizing all of it takes seconds), and it
    gives the whole text's first 256 tokens."""
    from stableembed.runtime.tokenize import CUT_RATIO

    paragraph = " ".join(t for t in real_texts if len(t) > 200)
    huge = (paragraph + " ") * (1_000_000 // len(paragraph) + 1)
    seen: list[int] = []
    real = enc.tokenizer._encode_batch

    def spy(texts, *rest):
        seen.extend(len(t) for t in texts)
        return real(texts, *rest)

    monkeypatch.setattr(enc.tokenizer, "_encode_batch", spy)
    v = enc.encode(huge)
    assert seen and max(seen) <= 2 * enc.max_length * CUT_RATIO < len(huge) // 50
    monkeypatch.undo()
    assert same_bits(v, enc.encode(huge[:20_000])).all()  # same first 256 tokens
    enc.tokenizer.tokenizer.enable_truncation(enc.max_length)
    assert enc.tokenizer.encode([huge])[0].ids == enc.tokenizer.tokenizer.encode(huge).ids


def _whole_text_ids(enc, text: str) -> list[int]:
    tok = enc.tokenizer.tokenizer
    tok.enable_truncation(enc.max_length)
    return tok.encode(text).ids


def _cut_cases(limit: int) -> dict[str, str]:
    head = "a " * 251  # 251 one-token words: the 256 tokens end right at the cut
    return {
        # no whitespace after the first cut point: the cut falls inside "together"
        "cut inside a word": head + "x" * (limit - len(head) - 5) + ".together." + "y" * 9000,
        # Python's \s matches \x1c, which the BERT normalizer deletes: "to\x1cgether" is one word
        "cut before a deleted control character": head + "x" * (limit - len(head) - 1) + ".to\x1cgether" + " z" * 5000,
        # no word in the first 262,144 characters: the whole text is read
        "300,000 spaces first": " " * 300_000 + "word " * 1000,
    }


@pytest.mark.parametrize("case", ["cut inside a word", "cut before a deleted control character", "300,000 spaces first"])
def test_a_huge_texts_prefix_gives_the_whole_texts_tokens(enc, case) -> None:
    from stableembed.runtime.tokenize import CUT_RATIO

    text = _cut_cases(enc.max_length * CUT_RATIO)[case]
    assert enc.tokenizer.encode([text])[0].ids == _whole_text_ids(enc, text)


def test_refuse_by_tokens_not_characters(minilm_artifact) -> None:
    strict = Encoder(minilm_artifact, truncate=False, check_hashes=False)
    exact = (" " * 40).join(["a"] * 254)  # 254 words and [CLS] [SEP]: exactly max_length, 10,414 characters
    assert len(_whole_text_ids(strict, exact)) == 256 and len(exact) > 256 * 32
    assert strict.encode([exact]).shape == (1, 384)
    with pytest.raises(ValueError, match="index 0 is longer than max_length"):
        strict.encode([" " * 300_000 + "word " * 1000])


def test_refuse_instead_of_truncate(minilm_artifact) -> None:
    strict = Encoder(minilm_artifact, truncate=False, check_hashes=False)
    assert strict.encode(["short enough"]).shape == (1, 384)
    with pytest.raises(ValueError, match="index 1 is longer than max_length"):
        strict.encode(["fine", "word " * 400])
    with pytest.raises(ValueError, match="index 0 is longer than max_length"):
        strict.encode(["word " * 300_000])


def test_the_same_text_from_concurrent_calls_runs_once(minilm_artifact, real_texts) -> None:
    """Callers that queue the same text behind a running batch are served by one row of the next run,
    each with the bits of the text encoded alone."""
    enc = Encoder(minilm_artifact, threads=1, check_hashes=False)
    text = next(t for t in real_texts if 20 < len(t) < 120)
    alone = enc.encode(text)
    inner, rows = enc.backend.run, []
    first_running, release = threading.Event(), threading.Event()

    def run(feeds):
        rows.append(feeds["input_ids"].shape[0])
        if len(rows) == 1:
            first_running.set()
            if not release.wait(60):
                raise TimeoutError("never released")
        return inner(feeds)

    enc.backend.run = run
    callers = 6
    with ThreadPoolExecutor(callers + 1) as pool:
        first = pool.submit(enc.encode, ["the first call holds the run lock"])
        assert first_running.wait(60)
        others = [pool.submit(enc.encode, [text]) for _ in range(callers)]
        deadline = time.monotonic() + 60
        while len(enc._pending) < callers:
            assert time.monotonic() < deadline, "calls did not queue"
            time.sleep(0.005)
        release.set()
        got = np.stack([f.result(60)[0] for f in others])
        first.result(60)
    assert rows == [1, 1], rows  # the held run, then one row for all six callers
    assert same_bits(got, np.stack([alone] * callers)).all()


def test_a_caller_whose_result_is_ready_does_not_run_the_next_round(minilm_artifact) -> None:
    """Flat combining: a caller answered by another thread's round returns; it does not take the run lock
    for requests that arrived meanwhile (their own callers run them)."""
    from stableembed.runtime.encoder import _Request

    enc = Encoder(minilm_artifact, threads=1, check_hashes=False)
    inner, runs = enc.backend.run, []

    def run(feeds):
        runs.append(threading.current_thread().name)
        return inner(feeds)

    enc.backend.run = run
    enc._run_lock.acquire()  # this thread plays the caller whose round answers the waiting one
    with ThreadPoolExecutor(1, thread_name_prefix="waiter") as pool:
        waiter = pool.submit(enc.encode, ["the waiting caller's text"])
        deadline = time.monotonic() + 60
        while not enc._pending:
            assert time.monotonic() < deadline, "the call did not queue"
            time.sleep(0.005)
        with enc._pending_lock:
            taken = list(enc._pending)
            enc._pending.clear()
        enc._run(taken)  # answers the waiter
        late = _Request(enc.tokenizer.encode(["a request that arrived during that round"]), 32,
                        np.zeros((1, enc.dim), np.float32))
        with enc._pending_lock:
            enc._pending.append(late)
        enc._run_lock.release()  # the waiter is blocked on this lock: it gets it first
        assert waiter.result(60).shape == (1, enc.dim)
    time.sleep(0.2)
    assert not late.done.is_set() and runs == ["MainThread"], runs  # the waiter ran nothing
    assert list(enc._pending) == [late]


@pytest.mark.parametrize("huge", ["word " * 12_000 + "\ud800", "a" * 20_000 + "\ud800"])
def test_a_lone_surrogate_past_a_huge_texts_prefix_names_its_index(enc, huge) -> None:
    """Huge texts are tokenized from a prefix; a lone surrogate after it is still refused, by the text's
    own index (in a list, and in a stream)."""
    with pytest.raises(ValueError, match="text at index 2 cannot be encoded as UTF-8"):
        enc.encode(["ok", "fine", huge])
    with pytest.raises(ValueError, match="text at index 5 cannot be encoded as UTF-8"):
        list(enc.encode_stream(["ok"] * 5 + [huge], chunk_size=4))
    # the character is counted in the caller's text, not after a prompt put before it
    at = f"at character {len(huge) - 1}\\)"
    with pytest.raises(ValueError, match=f"text at index 1 cannot be encoded as UTF-8 .*{at}"):
        enc.encode(["ok", huge], prompt="query: ")
    with pytest.raises(ValueError, match=r"text at index 1 cannot be encoded as UTF-8 .*at character 2\)"):
        enc.encode(["ok", "ab\ud800"], prompt="query: ")


def _queued_by_another_thread(enc: Encoder, texts: list[str], pool: ThreadPoolExecutor):
    """A worker's `encode(texts)`, left waiting in the queue: the caller holds the run lock."""
    before = len(enc._pending)
    future = pool.submit(enc.encode, texts)
    deadline = time.monotonic() + 30
    while len(enc._pending) == before:
        assert time.monotonic() < deadline, "the worker's request never queued"
        time.sleep(0.005)
    return future


def test_an_interrupt_while_combining_is_the_combining_callers_alone(minilm_artifact, real_texts,
                                                                     monkeypatch) -> None:
    """A KeyboardInterrupt in the thread that runs a round (the main thread, where Python delivers it)
    goes to that caller; the other callers' requests go back to the queue and are answered with their
    exact rows by their own threads."""
    enc = Encoder(minilm_artifact, check_hashes=False)
    mine, theirs = real_texts[:3], real_texts[3:9]
    ref = enc.encode(theirs)
    real, calls = enc.backend.run, []

    def interrupted(feeds):
        calls.append(threading.current_thread() is threading.main_thread())
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(feeds)

    monkeypatch.setattr(enc.backend, "run", interrupted)
    from stableembed.runtime.encoder import _Request

    with ThreadPoolExecutor(1) as pool:
        enc._run_lock.acquire()
        try:
            theirs_future = _queued_by_another_thread(enc, theirs, pool)
            own = _Request(enc.tokenizer.encode(mine), 32, np.empty((3, enc.dim), np.float32))
            enc._pending.append(own)
            with pytest.raises(KeyboardInterrupt):
                enc._run_round(own)  # this thread combines the round: both requests, one batch
            assert list(enc._pending) != [] and own not in enc._pending and not own.done.is_set()
        finally:
            enc._run_lock.release()
        assert same_bits(theirs_future.result(60), ref).all()
    assert calls[0] is True and calls[1:] and not any(calls[1:])  # the rest ran in the worker's thread
    assert not enc._pending


def test_a_second_interrupt_never_answers_with_unwritten_rows(minilm_artifact, real_texts, monkeypatch) -> None:
    """With parallel runs, a failed batch's round waits for its running batches; a KeyboardInterrupt during
    that wait must still leave every request answered with the backend's error, not with the rows it
    never wrote (which the cache would then keep)."""
    import concurrent.futures

    enc = Encoder(minilm_artifact, check_hashes=False, parallel_runs=2, threads=1, cache_size=64)
    theirs = real_texts[:40]

    def failing(feeds):
        raise RuntimeError("the backend failed")

    monkeypatch.setattr(enc.backend, "run", failing)
    real_exception = concurrent.futures.Future.exception

    def interrupted_wait(self, timeout=None):
        monkeypatch.setattr(concurrent.futures.Future, "exception", real_exception)
        raise KeyboardInterrupt

    from stableembed.runtime.encoder import _Request

    with ThreadPoolExecutor(1) as pool:
        enc._run_lock.acquire()
        try:
            theirs_future = _queued_by_another_thread(enc, theirs, pool)
            own = _Request(enc.tokenizer.encode(real_texts[40:80]), 4, np.empty((40, enc.dim), np.float32))
            enc._pending.append(own)
            monkeypatch.setattr(concurrent.futures.Future, "exception", interrupted_wait)
            with pytest.raises(KeyboardInterrupt):
                enc._run_round(own)
        finally:
            enc._run_lock.release()
        with pytest.raises(RuntimeError, match="the backend failed"):
            theirs_future.result(60)
    assert enc.cache.info().size == 0
    monkeypatch.undo()
    assert same_bits(enc.encode(theirs[:2]), Encoder(minilm_artifact, check_hashes=False).encode(theirs[:2])).all()


def test_an_interrupted_waiter_withdraws_its_request(minilm_artifact, monkeypatch) -> None:
    """A caller interrupted while it waits for a round (here: the run lock held elsewhere) takes its request
    out of the queue: the next call runs its own texts only."""
    import signal

    enc = Encoder(minilm_artifact, check_hashes=False)
    runs = []
    real = enc.backend.run
    monkeypatch.setattr(enc.backend, "run", lambda feeds: runs.append(feeds["input_ids"].shape[0]) or real(feeds))
    holder = threading.Event()
    release = threading.Event()

    def hold():
        with enc._run_lock:
            holder.set()
            release.wait(30)

    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(hold)
        assert holder.wait(30)
        timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                enc.encode([f"abandoned text {i}" for i in range(50)])
        finally:
            timer.cancel()
            release.set()
            held.result(30)
    assert not enc._pending
    enc.encode("the next call")
    assert runs == [1]
