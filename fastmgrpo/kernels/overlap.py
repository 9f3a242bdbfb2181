"""Two-stream overlap of the fused loss's chunk loop (opt-in: ``GRPOLossConfig.overlap_streams``).

Chunk i+1's Z GEMM runs on a side CUDA stream while chunk i's row pass and its d_h / d_W GEMMs
run on the current stream, in two logits buffers of half the memory budget each. Per chunk, in
host issue order (events only, never a host sync; b = i % 2, b' = (i + 1) % 2):

    side:  wait free[b'] ; Z GEMM(i+1) into buffer b' ; record ready[b']
    main:  wait ready[b] ; row pass(i), dlogits(i), d_h(i), d_W(i) ; record free[b]

free[b'] is recorded after chunk i−1's last GEMM, the last reader of buffer b', so the side stream
never overwrites logits or dlogits the main stream still reads, and the main stream never reads a
buffer before its GEMM is done. At the end the main stream waits for the side stream: the buffers
are freed (on the main stream) after their last use; at the start the side stream waits for the
main stream (the inputs, an earlier pass over the same buffers). Without CUDA there are no
streams and the chunk loop runs as before; `pipelined` itself is tested on CPU with streams that
run the side stream's work as late or as early as the events allow (tests/kernels/test_overlap.py).
"""
import torch


class CudaStreams:
    """The current stream of `device` (main) and a side stream for the Z GEMMs."""

    def __init__(self, device: torch.device):
        self.main = torch.cuda.current_stream(device)
        self.side = torch.cuda.Stream(device)

    def start(self):
        """The side stream waits for everything issued on the main stream so far: the inputs, and
        an earlier pass's use of the same buffers (the two-pass fallback runs two pipelines)."""
        self.side.wait_stream(self.main)

    def event(self):
        return torch.cuda.Event()

    def on_side(self):
        return torch.cuda.stream(self.side)

    def record(self, event, side: bool):
        event.record(self.side if side else self.main)

    def wait(self, event, side: bool):
        (self.side if side else self.main).wait_event(event)

    def finish(self):
        self.main.wait_stream(self.side)


def streams_for(device: torch.device, overlap: bool):
    """CudaStreams where the overlap is asked for and possible (CUDA), else None."""
    return CudaStreams(device) if overlap and device.type == "cuda" else None


def pipelined(streams, chunks, produce):
    """Yield (r0, r1, z) per chunk of `chunks`, z = produce(i, buffer) issued one chunk ahead on the
    side stream (buffer = i % 2); the main stream's work on a chunk is whatever the consumer issues
    before asking for the next one."""
    ready = [streams.event(), streams.event()]
    free = [streams.event(), streams.event()]

    def issue(i):
        with streams.on_side():
            if i >= 2:
                streams.wait(free[i % 2], side=True)
            z = produce(i, i % 2)
            streams.record(ready[i % 2], side=True)
        return z

    streams.start()
    try:
        ahead = issue(0)
        for i, (r0, r1) in enumerate(chunks):
            z = ahead
            if i + 1 < len(chunks):
                ahead = issue(i + 1)
            streams.wait(ready[i % 2], side=False)
            yield r0, r1, z
            streams.record(free[i % 2], side=False)
    finally:
        streams.finish()
