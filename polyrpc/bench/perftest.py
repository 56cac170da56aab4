"""The RDMA ceiling rows: perftest's ib_send_lat and ib_send_bw on the same device, same run.

``python3 -m polyrpc.bench.perftest --ip 10.77.0.1 --dev rxe0 [--json out.json]``
starts each tool's server, runs its client against it (connection set up with
rdma_cm, ``-R``), parses the result line and prints one row per tool and size.
These are what the verbs path can do without Python in it; ``polyrpc bench``
rows for rdma are compared against them as ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

MIB = 1 << 20


def _run_pair(tool: str, ip: str, dev: str, size: int, iters: int, port: int, *flags: str) -> str:
    """Run ``tool``'s server and client once; return the client's output."""
    common = [tool, "-d", dev, "-s", str(size), "-n", str(iters), "-F", "-R", "-p", str(port)]
    common += flags
    server = subprocess.Popen(
        common,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            time.sleep(0.5)
            client = subprocess.run([*common, ip], capture_output=True, text=True, timeout=300)
            if client.returncode == 0 or time.monotonic() > deadline:
                break
        if client.returncode != 0:
            raise RuntimeError(f"{tool} failed: {(client.stdout + client.stderr).strip()[-400:]}")
        return client.stdout
    finally:
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _result_line(output: str, size: int) -> list[str]:
    for line in output.splitlines():
        fields = line.split()
        if fields and fields[0] == str(size) and len(fields) >= 4:
            return fields
    raise RuntimeError(f"no result line for {size} bytes in:\n{output}")


def send_lat(ip: str, dev: str, size: int, iters: int = 2000) -> dict:
    """ib_send_lat: typical (median) and 99th percentile one-way latency in microseconds."""
    fields = _result_line(_run_pair("ib_send_lat", ip, dev, size, iters, 18515), size)
    # #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%
    return {
        "transport": "perftest ib_send_lat",
        "kind": "ceiling",
        "payload_bytes": size,
        "p50_us": float(fields[4]),
        "p99_us": float(fields[7]),
    }


def send_bw(ip: str, dev: str, size: int, iters: int = 1000, both_ways: bool = False) -> dict:
    """ib_send_bw: average bandwidth in MB/s (10^6 bytes, like polyrpc bench's mb_per_s).

    ``both_ways`` runs it bidirectionally (``-b``), the fair ceiling for an echo workload,
    which moves every payload through the device twice; perftest then reports the sum.
    """
    flags = ("-b",) if both_ways else ()
    output = _run_pair("ib_send_bw", ip, dev, size, iters, 18516 + both_ways, *flags)
    fields = _result_line(output, size)
    # #bytes #iterations BW-peak[MiB/s] BW-average[MiB/s] MsgRate[Mpps]
    return {
        "transport": "perftest ib_send_bw" + (" -b" if both_ways else ""),
        "kind": "ceiling",
        "payload_bytes": size,
        "mb_per_s": float(fields[3]) * MIB / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry: print (and optionally save) the perftest ceiling rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ip", required=True, help="IP of the RDMA interface (server side)")
    parser.add_argument("--dev", default="rxe0", help="RDMA device")
    parser.add_argument("--lat-size", type=int, default=64)
    parser.add_argument("--bw-size", type=int, default=1 << 20)
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--compare", help="a `polyrpc bench --json` file to compare against")
    args = parser.parse_args(argv)
    for tool in ("ib_send_lat", "ib_send_bw"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install perftest", file=sys.stderr)
            return 2
    rows = [
        send_lat(args.ip, args.dev, args.lat_size),
        send_bw(args.ip, args.dev, args.bw_size),
        send_bw(args.ip, args.dev, args.bw_size, both_ways=True),
    ]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
    if args.compare:
        with open(args.compare) as src:
            compare(json.load(src), rows)
    return 0


def compare(bench: dict | list, ceiling: list[dict]) -> None:
    """Print rdma's one-way stream and echo bulk as fractions of ib_send_bw (one way and -b)
    and rdma vs tcp latency (same run, same VM)."""
    results = bench["results"] if isinstance(bench, dict) else bench
    got = {(r["transport"], r["workload"]): r for r in results if "mb_per_s" in r}
    bw, both = ceiling[1]["mb_per_s"], ceiling[2]["mb_per_s"]
    rdma_bulk, rdma_stream = got.get(("rdma", "bulk")), got.get(("rdma", "stream"))
    if (rdma_bulk or rdma_stream) and not (bw > 0 and both > 0):
        # seen under a busy host: perftest printed a zero average for the whole run
        print(f"no bulk ratio: perftest measured ib_send_bw {bw} MB/s, -b {both} MB/s")
        rdma_bulk = rdma_stream = None
    if rdma_stream:
        rate = rdma_stream["mb_per_s"]
        print(
            f"rdma stream (one-way messages) {rate:.1f} MB/s = {rate / bw:.2f} x ib_send_bw "
            f"{bw:.1f} MB/s; {rdma_stream['payload_bytes']} bytes"
        )
    if rdma_bulk:
        rate = rdma_bulk["mb_per_s"]
        print(
            f"rdma bulk (echo) {rate:.1f} MB/s each way = {rate / bw:.2f} x ib_send_bw "
            f"{bw:.1f} MB/s (one way); both directions {2 * rate:.1f} MB/s = "
            f"{2 * rate / both:.2f} x ib_send_bw -b {both:.1f} MB/s; "
            f"{ceiling[1]['payload_bytes']} bytes"
        )
    rdma_lat, tcp_lat = got.get(("rdma", "latency")), got.get(("tcp", "latency"))
    if rdma_lat and tcp_lat:
        print(
            f"latency p50: rdma {rdma_lat['p50_us']:.0f} us, tcp {tcp_lat['p50_us']:.0f} us "
            f"(ratio {rdma_lat['p50_us'] / tcp_lat['p50_us']:.2f}); "
            f"ib_send_lat typical {ceiling[0]['p50_us']:.1f} us"
        )


if __name__ == "__main__":
    sys.exit(main())
