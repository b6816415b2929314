"""The serving scheduler without a model (it imports no jax): admission, rows, sliding past the context, finishing
and cancellation, as docs/serving.md describes them. A fake device follows the row moves, so that every decode step
checks that row i of the cache holds running sequence i."""
import collections
import subprocess
import sys

import pytest

from jaxgpt.serving.request import QueueFull, Request, Sampling
from jaxgpt.serving.scheduler import Scheduler

BLOCK = 16  # block_size: past the context a row restarts from its last 8 tokens (block_size // 2)


class Device:
    """What the model runner's cache rows hold (the sequence written there), and the calls made."""

    def __init__(self, scheduler: Scheduler, next_token=lambda seq: 1):
        self.scheduler, self.next_token = scheduler, next_token
        self.rows: dict[int, object] = {}
        self.written: dict[int, int] = {}  # row -> how many of its first cache slots hold its context
        self.batches = []

    def move(self, moves):
        if moves:
            assert len(moves.src) == len(moves.dst)
            assert all(moves.positions >= self.written[s] for s in moves.src)  # a move copies all a row wrote
            for table in (self.rows, self.written):
                table.update({d: table[s] for s, d in zip(moves.src, moves.dst)})

    def step(self):
        """One engine step: schedule -> run -> postprocess; -> the batch run, or None."""
        self.move(self.scheduler.release_cancelled())
        batch = self.scheduler.schedule()
        if batch is None:
            return None
        if batch.prefill:
            for seq, row, context in zip(batch.seqs, batch.rows, batch.contexts):
                self.rows[row], self.written[row] = seq, len(context)
        else:
            assert [self.rows[i] for i in range(len(batch.seqs))] == batch.seqs  # rows [0, running), in order
            for i, seq in enumerate(batch.seqs):
                self.written[i] = seq.pos + 1  # a decode step writes its token's keys and values at slot pos
        self.batches.append(batch)
        self.move(self.scheduler.postprocess(batch, [self.next_token(q) for q in batch.seqs]))
        return batch


def request(prompt_len=3, n=1, max_tokens=100, log=None):
    log = {} if log is None else log
    return Request(list(range(1, prompt_len + 1)), Sampling(max_tokens=max_tokens), n,
                   on_token=lambda c, t: log.setdefault(("token", c), []).append(t),
                   on_finish=lambda c, why: log.__setitem__(("finish", c), why))


def scheduler(max_batch=4, max_queue=16, eot_id=None):
    return Scheduler(max_batch=max_batch, block_size=BLOCK, max_queue=max_queue, eot_id=eot_id)


def test_admits_in_arrival_order_whatever_fits_in_one_prefill():
    """Between two steps every waiting request whose n sequences fit the free rows joins, in arrival order, and
    all of them are prefilled in one call; a request that does not fit waits, and none overtakes it."""
    s = scheduler(max_batch=4)
    device = Device(s)
    a, b, c = request(n=2, max_tokens=1), request(n=3), request(n=1)
    for r in (a, b, c):
        s.add(r)
    first = device.step()
    assert first.prefill and first.seqs == a.sequences and first.rows == [0, 1]
    assert [r.n for r in s.waiting] == [3, 1]  # b does not fit beside a, and c stays behind b
    second = device.step()  # a ended at its one token: b and c fit together now
    assert second.prefill and second.seqs == b.sequences + c.sequences and second.rows == [0, 1, 2, 3]
    assert device.step().prefill is False and not s.waiting  # then they decode together


def test_running_rows_stay_first_and_a_finished_row_takes_the_last():
    """Running sequences hold rows [0, running); a finished one's row takes the last running row's cache."""
    s = scheduler(max_batch=4)
    device = Device(s)
    requests = [request(max_tokens=m) for m in (5, 2, 5, 5)]
    for r in requests:
        s.add(r)
    device.step()  # the prefill of all four: rows 0..3
    device.step()  # request 1 has its 2 tokens: row 3 moves into row 1
    assert s.running == [requests[0].sequences[0], requests[3].sequences[0], requests[2].sequences[0]]
    assert device.rows[1] is requests[3].sequences[0]
    device.step()  # Device.step asserts rows [0, 3) hold the running sequences in order
    assert s.stats()["running"] == 3


def test_end_of_text_stops_unseen_and_max_tokens_ends_with_length():
    eot = 7
    s = scheduler(eot_id=eot)
    stopped, full = {}, {}
    s.add(request(max_tokens=10, log=stopped))
    s.add(request(max_tokens=3, log=full))
    tokens = iter([5, 5, 5, 5, eot, 5, 5, 5])
    device = Device(s, next_token=lambda seq: next(tokens))
    while device.step():
        pass
    assert stopped == {("token", 0): [5, 5], ("finish", 0): "stop"}  # end of text is not part of the text
    assert full == {("token", 0): [5, 5, 5], ("finish", 0): "length"}
    assert s.stats()["running"] == 0


@pytest.mark.parametrize("prompt_len, first_context", [(5, 5), (BLOCK - 1, BLOCK - 1), (BLOCK, 8), (BLOCK + 9, 8)])
def test_slides_from_the_last_half_block_once_the_context_is_full(prompt_len, first_context):
    """A prompt of block_size tokens or more is cut to its last block_size // 2; once a row's prompt and tokens
    fill block_size, it is prefilled again, in its own row, from the last block_size // 2 tokens of its prompt and
    output (docs/serving.md, "Past the context")."""
    s = scheduler(max_batch=2)
    device = Device(s, next_token=lambda seq: 100 + len(seq.tokens))
    s.add(request(prompt_len=1, max_tokens=3 * BLOCK))  # a short neighbour in row 0
    r = request(prompt_len=prompt_len, max_tokens=3 * BLOCK)
    s.add(r)
    seq = r.sequences[0]
    device.step()
    assert device.batches[0].contexts[1] == r.prompt[-first_context:]
    window = first_context + 1  # the window's prompt and tokens: the prefill gave one
    slides = 0
    while device.step():
        batch = device.batches[-1]
        if batch.prefill and seq in batch.seqs:
            text = r.prompt + seq.tokens[:-1]  # before the token this prefill produced
            assert window == BLOCK and batch.contexts[batch.seqs.index(seq)] == text[-8:]
            assert batch.rows[batch.seqs.index(seq)] == 1  # its own row
            window, slides = 8 + 1, slides + 1
        window += 1 if seq in batch.seqs and not batch.prefill else 0
    assert slides >= 4 and len(seq.tokens) == 3 * BLOCK


def test_cancel_ends_running_and_waiting_sequences_and_frees_their_rows():
    """A cancelled request's sequences end with 'cancelled' at the next step and their rows are free; cancelling
    one choice leaves the others running; a cancelled waiting request ends when its turn comes, unrun."""
    s = scheduler(max_batch=4)
    device = Device(s)
    logs = [{}, {}, {}]
    running, single, waiting = request(n=2, log=logs[0]), request(n=2, log=logs[1]), request(n=2, log=logs[2])
    for r in (running, single, waiting):
        s.add(r)
    device.step()
    s.cancel(running)
    s.cancel(single, 1)
    s.cancel(waiting)
    batch = device.step()  # the waiting request is dropped at admission: a decode step of the one choice left
    assert not batch.prefill and batch.seqs == [single.sequences[0]] and s.stats()["running"] == 1
    assert logs[0][("finish", 0)] == logs[0][("finish", 1)] == logs[1][("finish", 1)] == "cancelled"
    assert ("finish", 0) not in logs[1]
    assert [logs[2][("finish", c)] for c in range(2)] == ["cancelled"] * 2 and ("token", 0) not in logs[2]
    assert all(b.seqs != waiting.sequences for b in device.batches)


def test_a_full_queue_refuses_and_a_failure_takes_every_sequence():
    s = scheduler(max_batch=1, max_queue=2)
    device = Device(s)
    first, second, third = request(), request(), request()
    s.add(first)
    s.add(second)
    with pytest.raises(QueueFull, match="busy"):
        s.add(third)
    device.step()  # first runs, second waits
    assert s.take_all() == first.sequences + second.sequences
    assert s.stats()["running"] == s.stats()["waiting"] == 0


def test_the_counters_and_stats_say_what_ran():
    """stats() (GET /healthz's numbers): running and waiting sequences, max_batch, and the counters: decode steps,
    tokens emitted, the most rows a decode step ran, rows prefilled again past the context; counted here from what
    the fake device ran and what the requests received."""
    s = scheduler(max_batch=3, eot_id=7)
    device = Device(s, next_token=lambda seq: 7 if len(seq.tokens) == 20 else 5)  # the 21st token ends a choice
    received = {}
    requests = [request(prompt_len=p, n=n, max_tokens=m, log=received.setdefault(i, {}))
                for i, (p, n, m) in enumerate([(3, 2, 30), (12, 1, 4), (5, 1, 9), (2, 3, 2), (14, 1, 3)])]
    for r in requests:
        s.add(r)
    assert s.stats() == dict(running=0, waiting=5, max_batch=3, steps=0, tokens=0, max_rows=0, slides=0)
    seen = set()
    decode_rows, slides = [], 0
    while (batch := device.step()) is not None:
        if batch.prefill:
            slides += sum(seq_id in seen for seq_id in map(id, batch.seqs))
            seen.update(map(id, batch.seqs))
        else:
            decode_rows.append(len(batch.seqs))
    tokens = sum(len(t) for log in received.values() for key, t in log.items() if key[0] == "token")
    assert slides > 0 and len(set(decode_rows)) > 1  # the run slid past the context, with several batch sizes
    assert s.stats() == dict(running=0, waiting=0, max_batch=3, steps=len(decode_rows), tokens=tokens,
                             max_rows=max(decode_rows), slides=slides)
    assert s.counters.batch_rows == collections.Counter(decode_rows)


def test_the_scheduler_imports_no_jax():
    code = "import sys, jaxgpt.serving.scheduler; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('jax', 'jaxlib', 'flax', 'numpy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
