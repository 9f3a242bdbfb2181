"""The padded loss's one collective is explicit: `process_group` all-reduces the DAPO token
normaliser over that group, None keeps it local, and the Liger drop-in uses the world group."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmgrpo.kernels import FusedLinearGRPOLoss, GRPOLossConfig, fused_linear_grpo_loss

B, T, H, V = 3, 5, 8, 32


def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(1234 + rank)
        x = torch.randn(B, T, H, generator=g)
        w = torch.randn(V, H, generator=g)
        ids = torch.randint(0, V, (B, T), generator=g)
        mask = (torch.rand(B, T, generator=g) < 0.3 + 0.5 * rank).float()  # ranks hold different counts
        adv = torch.randn(B, generator=g)
        cfg = GRPOLossConfig(beta=0.0, loss_type="dapo")
        args = (x, w, ids, mask, adv)
        local, _ = fused_linear_grpo_loss(*args, config=cfg, use_ref_model=False)
        grouped, _ = fused_linear_grpo_loss(*args, config=cfg, use_ref_model=False,
                                            process_group=dist.group.WORLD)
        module, _ = FusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")(*args)
        counts = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(counts, mask.sum())
        torch.save({"local": local, "grouped": grouped, "module": module, "mine": mask.sum(),
                    "counts": torch.stack(counts)}, f"{out}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_dapo_normaliser_is_reduced_over_the_given_group(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"r{rank}.pt")
        assert r["counts"][0] != r["counts"][1]  # otherwise the test could not tell the two apart
        mine, world_mean = r["mine"].clamp(min=1), (r["counts"].sum() / 2).clamp(min=1)
        # the same per-token sum divided by the local count vs the world's mean count
        torch.testing.assert_close(r["grouped"], r["local"] * mine / world_mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["module"], r["grouped"], rtol=0, atol=0)
