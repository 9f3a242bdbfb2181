"""The two-stream chunk pipeline (kernels/overlap.py) on CPU, with fake streams.

`pipelined` only orders work through events. The fake side stream queues its work and runs it as
late as the events allow (when the main stream waits for it: a missing wait hands the consumer a
buffer whose GEMM has not run) or as early as they allow (at once: a buffer reused too soon
overwrites logits the consumer still reads); every buffer write checks that the side stream
waited for the main stream's last use of that buffer first.
"""
import pytest
import torch
from test_fused import _fused_loss, _problem, _rel

from fastmgrpo.kernels import GRPOLossConfig, fused, overlap


class FakeStreams:
    """Side-stream work is queued and run `late` (at the main stream's wait) or at once."""

    def __init__(self, late: bool):
        self.late, self.queue, self.side_depth, self.log = late, [], 0, []
        self.side_waits = []  # when (index in log) each event the side stream waited for was recorded

    def event(self):
        return {"recorded": None}

    def on_side(self):
        streams = self

        class _Side:
            def __enter__(self):
                streams.side_depth += 1

            def __exit__(self, *exc):
                streams.side_depth -= 1
        return _Side()

    def record(self, event, side: bool):
        if side:
            self.queue.append(("record", event))
        else:
            event["recorded"] = len(self.log)
        if not self.late:
            self._run()

    def wait(self, event, side: bool):
        if side:
            self.queue.append(("wait", event))
        else:
            self._run(until=event)

    def submit(self, fn):
        """Side-stream work (the fake GEMM)."""
        self.queue.append(("work", fn))
        if not self.late:
            self._run()

    def _run(self, until=None):
        while self.queue:
            kind, item = self.queue.pop(0)
            if kind == "record":
                item["recorded"] = len(self.log)
                if item is until:
                    return
            elif kind == "wait":
                assert item["recorded"] is not None, "side stream waits for an event the main stream never recorded"
                self.side_waits.append(item["recorded"])
            else:
                item()

    def start(self):
        """Main-stream work is synchronous here: nothing issued before is pending."""

    def finish(self):
        self._run()


@pytest.mark.parametrize("late", [True, False])
def test_pipeline_orders_buffers_by_events(late):
    """Each chunk's consumer sees its own logits, whatever the side stream's timing, and a buffer
    is written again only after the side stream waited for the consumer's end of its last chunk."""
    streams = FakeStreams(late)
    chunks = [(0, 3), (3, 6), (6, 8), (8, 11), (11, 12)]
    buffers = torch.full((2, 4), float("nan"))
    last_use = {}  # buffer -> index in streams.log of the end of its last consumer

    def produce(i, b):
        def gemm():
            if i >= 2:  # the side stream last waited for an event recorded after this buffer's last use
                assert streams.log[last_use[b]] == ("done", i - 2)
                assert streams.side_waits and streams.side_waits[-1] > last_use[b]
            buffers[b] = float(i)
            streams.log.append(("gemm", i))
        streams.submit(gemm)
        return buffers[b]

    for i, (r0, r1, z) in enumerate(overlap.pipelined(streams, chunks, produce)):
        assert (r0, r1) == chunks[i] and torch.all(z == i), (i, z)
        streams.log.append(("done", i))
        last_use[i % 2] = len(streams.log) - 1
    assert [e for e in streams.log if e[0] == "gemm"] == [("gemm", i) for i in range(len(chunks))]
    assert not streams.queue


@pytest.mark.parametrize("late", [True, False])
def test_fused_loss_with_two_buffers_equals_one(monkeypatch, late):
    """The whole fused loss through the pipeline (two half-budget buffers, chunk i+1's logits made
    before chunk i's gradients) gives the one-buffer loop's loss and gradients."""
    V = 97
    d = _problem(41, 16, V, torch.float32, True)
    cfg = GRPOLossConfig(beta=0.04, loss_type="grpo", memory_budget=8 * V * 4)
    base = _fused_loss(d, torch.float32, cfg, "torch")
    made = []

    def streams_for(device, wanted):
        made.append(wanted)
        return FakeStreams(late) if wanted else None

    monkeypatch.setattr(overlap, "streams_for", streams_for)
    real_pipelined = overlap.pipelined

    def pipelined(streams, chunks, produce):  # the fake's side stream runs the GEMMs itself
        def queued(i, b):
            out = []
            streams.submit(lambda: out.append(produce(i, b)))
            return _Lazy(out)
        for r0, r1, z in real_pipelined(streams, chunks, queued):
            yield r0, r1, z.value()

    monkeypatch.setattr(overlap, "pipelined", pipelined)
    loss, grads, metrics = _fused_loss(d, torch.float32, GRPOLossConfig(**{**vars(cfg), "overlap_streams": True}),
                                       "torch")
    assert made == [True]
    assert len(fused.chunk_rows(fused.Plan(d["targets"], d["cu"].tolist(), False, 1.0, None, fused.torch_backend,
                                           cfg.memory_budget), V, torch.float32, buffers=2)[0]) > 2
    assert abs(loss - base[0]).item() <= 1e-5 * abs(base[0]).item()
    for a, b in zip(grads, base[1]):
        assert _rel(a, b) <= 1e-5


class _Lazy:
    """A side-stream result read by the consumer only after its ready event (a fake tensor handle)."""

    def __init__(self, out):
        self.out = out

    def value(self):
        assert self.out, "the consumer reads logits whose GEMM has not run"
        return self.out[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real streams need CUDA")
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cuda_two_streams_equal_one(level):
    """On CUDA, the two-stream pipeline gives the one-stream loop's loss and gradients (the same
    kernels on the same chunks; cuBLAS on another stream may sum in another order: a 16-bit
    rounding apart at most), over many chunks, the two-pass fallback included."""
    V = 4096
    d = _problem(42, 64, V, torch.bfloat16, False, lengths=[300, 7, 500, 1, 260])
    runs = []
    for overlap_streams, rows in ((False, 64), (True, 128)):  # two buffers of the same 64 rows
        cfg = GRPOLossConfig(beta=0.04, loss_type="grpo", importance_sampling_level=level,
                             memory_budget=rows * V * 4, overlap_streams=overlap_streams)
        runs.append(_fused_loss(d, torch.bfloat16, cfg, "triton"))
    (loss, grads, _), (loss2, grads2, _) = runs
    assert abs(loss - loss2).item() <= 1e-6 * abs(loss).item()
    assert all(_rel(a, b) <= 2.0 ** -8 for a, b in zip(grads, grads2) if a is not None)
