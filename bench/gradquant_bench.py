"""Throughput of the quantized gradient exchange (mpqflow/comm/codes.py) against a float32 all_reduce.

Usage:
    .venv/bin/python bench/gradquant_bench.py                    # 1 and 4 MB, 2-4 bits, CPU (+ CUDA if present)
    .venv/bin/python bench/gradquant_bench.py --sizes 16 64 --bits 3 --repeats 10 --device cuda
    .venv/bin/python bench/gradquant_bench.py --no-collectives   # the codec only

Measured, per device (cpu; cuda where torch.cuda.is_available(), with --device auto), gradient size
(--sizes, MB = 10^6 bytes of float32), method and bits: the time of `encode`, `pack_codes`,
`unpack_codes`, `decode`, and of the whole encode -> pack -> unpack -> decode path, each the
median of --repeats timed calls after one warm-up, as throughput in MB/s of float32 gradient
(4 x numel bytes / seconds). Methods: `qsgd` (uniform levels) and `alq` (levels fitted by
fit_truncnorm + alq_levels to the benchmark gradient, L2 buckets; the fit's time is printed).
The gradient is N(0, 1) entries scaled per bucket by exp(N(0, 1)) (layers of different scale).

Collectives (--no-collectives skips them): 2 processes spawned with torch.multiprocessing, gloo on a
free localhost port, CPU tensors, intra-op threads split between them. Per size: the float32
all_reduce of the gradient (what DDP does without a hook), and per bits the all_gather of the
packed codes plus the all_gather of the float32 bucket norms (what the quantizing hook sends): the
median time per call over --comm-repeats calls, each started after a barrier, and its rate in MB/s of
float32 gradient. The last lines, one per setting, put the codec and the collectives together:
quantized exchange = encode + pack + all_gathers + 2 x (unpack + decode) (every rank decodes both
ranks' codes), from the separate medians, against the float all_reduce.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpqflow.comm.codes import decode, encode, pack_codes, unpack_codes  # noqa: E402
from mpqflow.levels.fit import alq_levels, fit_truncnorm, levels_for_bits, uniform_levels  # noqa: E402

MB = 1e6
STAGES = ("encode", "pack", "unpack", "decode", "path")


def gradient(size_mb: float, bucket_size: int, seed: int = 0) -> torch.Tensor:
    """(numel,) float32 gradient-like tensor of size_mb MB."""
    g = torch.Generator().manual_seed(seed)
    numel = int(round(size_mb * MB / 4))
    buckets = -(-numel // bucket_size)
    scale = torch.exp(torch.randn(buckets, generator=g)).repeat_interleave(bucket_size)[:numel]
    return torch.randn(numel, generator=g) * scale


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def codec_times(v: torch.Tensor, levels: torch.Tensor, bits: int, bucket_size: int, repeats: int) -> dict:
    """Median seconds of each codec stage and of the whole path on v's device."""
    device = str(v.device)
    gen = torch.Generator(device=v.device).manual_seed(0)
    lv = levels.to(v.device)
    codes, norms = encode(v, lv, bucket_size, gen)
    packed = pack_codes(codes, bits)
    numel = v.numel()

    def path():
        c, n = encode(v, lv, bucket_size, gen)
        return decode(unpack_codes(pack_codes(c, bits), bits, numel), n, lv, bucket_size)

    return {
        "encode": _median_time(lambda: encode(v, lv, bucket_size, gen), repeats, device),
        "pack": _median_time(lambda: pack_codes(codes, bits), repeats, device),
        "unpack": _median_time(lambda: unpack_codes(packed, bits, numel), repeats, device),
        "decode": _median_time(lambda: decode(codes, norms, lv, bucket_size), repeats, device),
        "path": _median_time(path, repeats, device),
    }


# ---------------------------------------------------------------- 2 gloo processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed_collective(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats calls, each started after a barrier (one warm-up call)."""
    import torch.distributed as dist

    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _all_gather_codes(packed: torch.Tensor, norms: torch.Tensor, world: int) -> None:
    """What the quantizing hook sends: the packed codes and the bucket norms of every rank."""
    import torch.distributed as dist

    dist.all_gather([torch.empty_like(packed) for _ in range(world)], packed)
    dist.all_gather([torch.empty_like(norms) for _ in range(world)], norms)


def _collective_worker(rank, world, port, sizes, bits_list, bucket_size, repeats, threads, queue):
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = []
        for size in sizes:
            v = gradient(size, bucket_size, seed=rank)
            buf = v.clone()
            seconds = _timed_collective(functools.partial(dist.all_reduce, buf), repeats)
            results.append({"size": size, "op": "all_reduce", "bytes": buf.nbytes, "s": seconds})
            for bits in bits_list:
                lv = uniform_levels(levels_for_bits(bits))
                codes, norms = encode(v, lv, bucket_size, torch.Generator().manual_seed(rank))
                packed = pack_codes(codes, bits)
                seconds = _timed_collective(functools.partial(_all_gather_codes, packed, norms, world), repeats)
                sent = packed.nbytes + norms.nbytes
                results.append({"size": size, "op": f"all_gather {bits}b", "bits": bits, "bytes": sent, "s": seconds})
        if rank == 0:
            queue.put(results)
    finally:
        dist.destroy_process_group()


def collective_times(sizes, bits_list, bucket_size, repeats) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    threads = max(1, (os.cpu_count() or 2) // 2)
    args = (2, _free_port(), sizes, bits_list, bucket_size, repeats, threads, queue)
    mp.spawn(_collective_worker, args=args, nprocs=2, join=True)
    return queue.get()


# ---------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 4.0], help="gradient sizes, MB of float32")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=["qsgd", "alq"], choices=["qsgd", "alq"])
    ap.add_argument("--bucket-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per codec measurement (median)")
    ap.add_argument("--comm-repeats", type=int, default=30, help="timed calls per collective (median)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--no-collectives", action="store_true", help="skip the 2-process gloo measurements")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), "cpu": ["cpu"], "cuda": ["cuda"]}
    devices = devices[args.device]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, "
          f"devices {devices}, bucket {args.bucket_size}, median of {args.repeats} calls "
          f"(collectives: {args.comm_repeats})")  # fmt: skip

    # levels: fitted once per bits to the largest gradient (CPU, as the hook's refit does)
    fit_v = gradient(max(args.sizes), args.bucket_size)
    levels = {}
    for bits in args.bits:
        n = levels_for_bits(bits)
        if "qsgd" in args.methods:
            levels["qsgd", bits] = uniform_levels(n)
        if "alq" in args.methods:
            t0 = time.perf_counter()
            levels["alq", bits] = alq_levels(fit_truncnorm(fit_v, args.bucket_size), n)
            fit_s = time.perf_counter() - t0
            print(
                f"alq {bits} bits: levels {[round(float(x), 4) for x in levels['alq', bits]]}, fitted in {fit_s:.2f} s"
            )

    codec = {}
    head = f"{'device':6} {'MB':>6} {'method':6} {'bits':>4} " + " ".join(f"{s:>9}" for s in STAGES)
    print("\ncodec throughput, MB/s of float32 gradient (median time in ms for the path)")
    print(head)
    print("-" * len(head))
    for device in devices:
        for size in args.sizes:
            v = gradient(size, args.bucket_size).to(device)
            for (method, bits), lv in levels.items():
                t = codec_times(v, lv, bits, args.bucket_size, args.repeats)
                codec[device, size, method, bits] = t
                rates = " ".join(f"{4 * v.numel() / MB / t[s]:9.1f}" for s in STAGES)
                print(f"{device:6} {size:6.1f} {method:6} {bits:4d} {rates}   ({t['path'] * 1e3:.1f} ms)")

    if args.no_collectives:
        return
    coll = collective_times(args.sizes, args.bits, args.bucket_size, args.comm_repeats)
    print("\n2 processes, gloo, CPU tensors: time per call, MB/s of float32 gradient")
    print(f"{'MB':>6} {'collective':14} {'bytes/rank':>11} {'ratio':>6} {'ms':>8} {'MB/s':>8}")
    allreduce = {}
    gathers = {}
    for r in coll:
        full = 4 * int(round(r["size"] * MB / 4))
        if r["op"] == "all_reduce":
            allreduce[r["size"]] = r["s"]
        else:
            gathers[r["size"], r["bits"]] = r["s"]
        print(f"{r['size']:6.1f} {r['op']:14} {r['bytes']:11d} {r['bytes'] / full:6.3f} {r['s'] * 1e3:8.2f} "
              f"{full / MB / r['s']:8.1f}")  # fmt: skip

    print("\nper setting: quantized exchange (encode + pack + all_gathers + 2 x (unpack + decode)) vs float all_reduce")
    for (device, size, method, bits), t in codec.items():
        gather = gathers[size, bits]
        exchange = t["encode"] + t["pack"] + gather + 2 * (t["unpack"] + t["decode"])
        full = 4 * int(round(size * MB / 4))
        print(f"{device} {size:g} MB {method} {bits} bits: path {full / MB / t['path']:.1f} MB/s, all_gather "
              f"{gather * 1e3:.2f} ms, quantized exchange {exchange * 1e3:.1f} ms vs all_reduce "
              f"{allreduce[size] * 1e3:.1f} ms ({allreduce[size] / exchange:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
