#!/usr/bin/env bash
# Builds and runs the soft-RoCE test VM: a stock Debian kernel with rdma_rxe under qemu (TCG),
# so the rdma transport is tested with real verbs on hosts that have no RDMA device.
#
#   vm/rdma-vm.sh build              build the image (cached; rebuilt when its inputs change)
#   vm/rdma-vm.sh test [PYTEST ARGS] run the RDMA suite (and the netem bench test) in the VM;
#                                    exit status is pytest's
#   vm/rdma-vm.sh run CMD...         run any shell command in the VM (from the checkout root)
#   vm/rdma-vm.sh bench [ARGS]       run `polyrpc bench` plus perftest ceilings in the VM
#   vm/rdma-vm.sh bench-impaired [ARGS]
#                                    `polyrpc bench` over tcp, quic and kcp through netem on a
#                                    veth pair in the VM (real loss for TCP too); see
#                                    vm/guest-impaired.sh for the defaults ARGS replace
#   vm/rdma-vm.sh check              exit 0 if this host can build and run the VM, else say why
#
# Environment: POLYRPC_VM_CACHE (default /var/cache/polyrpc-vm), POLYRPC_VM_MIRROR,
# POLYRPC_VM_TIMEOUT (seconds per VM run, default 3600), POLYRPC_VM_SMP, POLYRPC_VM_MEM,
# POLYRPC_VM_OUT (a directory: the JSON files the guest wrote to /results are copied there).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
CACHE=${POLYRPC_VM_CACHE:-/var/cache/polyrpc-vm}
MIRROR=${POLYRPC_VM_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
VM_TIMEOUT=${POLYRPC_VM_TIMEOUT:-3600}
VM_SMP=${POLYRPC_VM_SMP:-2}
VM_MEM=${POLYRPC_VM_MEM:-2048}
HOST_PY=/usr/bin/python3

say() { echo "rdma-vm: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

check_host() {
    # Prints why this host cannot build or run the VM, or nothing.
    if [ "$(id -u)" != 0 ]; then
        echo "needs root (debootstrap, apt-get); run: sudo vm/rdma-vm.sh test"
    elif [ "$(uname -m)" != x86_64 ]; then
        echo "needs an x86_64 host (the image is Debian amd64)"
    elif ! command -v apt-get >/dev/null; then
        echo "needs apt-get to install qemu-system-x86 and debootstrap (Debian or Ubuntu host)"
    fi
}

ensure_host_tools() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    command -v zstd >/dev/null || missing+=(zstd)
    [ -x "$HOST_PY" ] || missing+=(python3)
    "$HOST_PY" -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing host packages: ${missing[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

extract_vmlinux() {
    # Decompresses the ELF vmlinux out of a bzImage so qemu boots it through the PVH entry.
    "$HOST_PY" - "$1" "$2" <<'PY'
import gzip, lzma, subprocess, sys
data = open(sys.argv[1], "rb").read()
def attempts():
    for magic, fn in ((b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),
                      (b"\x1f\x8b\x08", lambda b: gzip.GzipFile(fileobj=__import__("io").BytesIO(b)).read()),
                      (b"\x28\xb5\x2f\xfd", lambda b: subprocess.run(["zstd", "-dcq"], input=b, capture_output=True).stdout)):
        pos = data.find(magic)
        while pos != -1:
            try:
                yield fn(data[pos:])
            except Exception:
                pass
            pos = data.find(magic, pos + 1)
for out in attempts():
    if out.startswith(b"\x7fELF"):
        open(sys.argv[2], "wb").write(out)
        sys.exit(0)
sys.exit("no ELF kernel found inside " + sys.argv[1])
PY
}

install_wheels() {
    # Installs vm/wheels.txt into the image at ROOT: downloaded by the host's pip (hash-checked,
    # the wheels built for the image's Python), installed offline by the image's pip.
    local root=$1 log pyver
    log=$(dirname "$root")/pip.log
    pyver=$(chroot "$root" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    say "pip install (in the image, python $pyver): $(grep -v '^#' "$HERE/wheels.txt" | cut -d' ' -f1 | xargs)"
    mkdir -p "$root/tmp/wheels"
    cp "$HERE/wheels.txt" "$root/tmp/wheels/"
    "$HOST_PY" -m pip download -q --require-hashes --no-deps --only-binary=:all: \
        --python-version "$pyver" --implementation cp --platform manylinux_2_34_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any \
        -d "$root/tmp/wheels" -r "$HERE/wheels.txt" >>"$log" 2>&1 ||
        die "pip download failed, see $log"
    chroot "$root" python3 -m pip install -q --no-index --find-links /tmp/wheels \
        --require-hashes --ignore-installed --break-system-packages --no-warn-script-location \
        -r /tmp/wheels/wheels.txt >>"$log" 2>&1 ||
        die "pip install in the image failed, see $log"
    rm -rf "$root/tmp/wheels"
}

do_build() {
    # Builds DIR/{vmlinux,initrd.img,root.ext4} from Debian packages.
    local out=$1 root=$1/rootfs pkgs
    pkgs=$(grep -v '^#' "$HERE/packages.txt" | xargs)
    say "debootstrap $SUITE (minbase) from $MIRROR"
    debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$out/debootstrap.log" 2>&1 ||
        die "debootstrap failed, see $out/debootstrap.log"
    mount -t proc proc "$root/proc"
    mount --bind /dev "$root/dev"
    trap 'umount "$root/proc" "$root/dev" 2>/dev/null || true' EXIT
    mkdir -p "$root/etc/initramfs-tools/conf.d"
    printf 'MODULES=list\nCOMPRESS=gzip\n' >"$root/etc/initramfs-tools/conf.d/polyrpc"
    say "apt-get install (in the image): $pkgs"
    chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold \
        $pkgs >"$out/apt.log" 2>&1 || die "apt-get in the image failed, see $out/apt.log"
    install_wheels "$root"
    printf 'virtio_pci\nvirtio_blk\next4\n' >>"$root/etc/initramfs-tools/modules"
    chroot "$root" update-initramfs -u -k all >>"$out/apt.log" 2>&1 || die "update-initramfs failed"
    install -m 0755 "$HERE/guest-boot.sh" "$root/sbin/polyrpc-boot"
    echo polyrpc-vm >"$root/etc/hostname"
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
    umount "$root/proc" "$root/dev"
    trap - EXIT
    say "extracting the kernel"
    extract_vmlinux "$(ls "$root"/boot/vmlinuz-* | head -n1)" "$out/vmlinux"
    cp "$(ls "$root"/boot/initrd.img-* | head -n1)" "$out/initrd.img"
    say "making the ext4 image"
    mkfs.ext4 -q -F -L polyroot -d "$root" "$out/root.ext4" 2G
    rm -rf --one-file-system "$root"
}

image_key() {
    # Hash of every build input: the build code, package and wheel lists, baked init and suite.
    { declare -f do_build install_wheels extract_vmlinux
        cat "$HERE/packages.txt" "$HERE/wheels.txt" "$HERE/guest-boot.sh"
        echo "$SUITE"; } | sha256sum | cut -c1-16
}

image_dir() { echo "$CACHE/bookworm-$(image_key)"; }

cmd_build() {
    local reason dir tmp start
    reason=$(check_host)
    [ -z "$reason" ] || die "$reason"
    ensure_host_tools
    dir=$(image_dir)
    if [ -f "$dir/complete" ]; then
        say "image cached at $dir"
        return 0
    fi
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9
    if [ -f "$dir/complete" ]; then
        say "image cached at $dir"
        return 0
    fi
    start=$(date +%s)
    tmp="$dir.tmp.$$"
    # one image at a time: drop images built from older inputs
    rm -rf --one-file-system "$CACHE"/bookworm-*
    mkdir -p "$tmp"
    do_build "$tmp"
    touch "$tmp/complete"
    mv "$tmp" "$dir"
    say "image built in $(($(date +%s) - start)) s: $dir"
}

run_vm() {
    # Boots the VM with the command file in RESULTS; returns the guest command's exit status.
    local results=$1 dir status start
    dir=$(image_dir)
    start=$(date +%s)
    say "booting the VM (qemu TCG, ${VM_SMP} cpu, ${VM_MEM} MiB, timeout ${VM_TIMEOUT} s)"
    set +e
    timeout -k 10 "$VM_TIMEOUT" qemu-system-x86_64 \
        -nodefaults -no-user-config -display none -no-reboot \
        -accel tcg,thread=multi -cpu max -smp "$VM_SMP" -m "$VM_MEM" \
        -kernel "$dir/vmlinux" -initrd "$dir/initrd.img" \
        -append "root=/dev/vda rw rootfstype=ext4 console=ttyS0 quiet loglevel=3 panic=-1 init=/sbin/polyrpc-boot" \
        -drive "file=$dir/root.ext4,format=raw,if=virtio,snapshot=on" \
        -virtfs "local,path=$REPO,mount_tag=project,security_model=none,readonly=on" \
        -virtfs "local,path=$results,mount_tag=results,security_model=none" \
        -serial stdio </dev/null
    local qrc=$?
    set -e
    if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
        say "the VM did not finish within ${VM_TIMEOUT} s (killed)"
        return 1
    fi
    if [ ! -s "$results/status" ]; then
        say "the VM exited (qemu status $qrc) without reporting a result: boot or setup failed"
        return 1
    fi
    status=$(cat "$results/status")
    say "VM finished in $(($(date +%s) - start)) s; guest exit status $status"
    return "$status"
}

run_in_vm() {
    # Writes the given shell text as the guest command and runs the VM.
    local results rc=0
    cmd_build
    results=$(mktemp -d /tmp/polyrpc-vm.XXXXXX)
    # CI=true reaches the guest too: there a skipped test is a failure as well
    if [ "${CI:-}" = true ]; then
        printf 'export CI=true\n%s\n' "$1" >"$results/cmd"
    else
        printf '%s\n' "$1" >"$results/cmd"
    fi
    run_vm "$results" || rc=$?
    if [ -n "${POLYRPC_VM_OUT:-}" ]; then
        mkdir -p "$POLYRPC_VM_OUT"
        find "$results" -maxdepth 1 -name '*.json' -exec cp -t "$POLYRPC_VM_OUT" {} +
    fi
    [ -n "${POLYRPC_VM_KEEP:-}" ] || rm -rf "$results"
    return "$rc"
}

quote_args() {
    local out="" a
    for a in "$@"; do out+=" $(printf '%q' "$a")"; done
    echo "$out"
}

cmd_test() {
    local cmd
    if [ $# -eq 0 ]; then
        # the RDMA suite on both device setups, then the netem bench test once (no RDMA in it)
        cmd="rc=0; sh vm/guest-test.sh tests/test_rdma_transport.py tests/test_conformance.py"
        cmd+=" tests/test_rpc_conformance.py || rc=1; PY_COLORS=0 python3 -m pytest"
        cmd+=" -p no:cacheprovider -q tests/test_bench_netem.py || rc=1; exit \$rc"
    else
        cmd="sh vm/guest-test.sh$(quote_args "$@")"
    fi
    run_in_vm "$cmd"
}

cmd_run() {
    [ $# -gt 0 ] || die "usage: vm/rdma-vm.sh run CMD..."
    run_in_vm "$*"
}

cmd_bench() {
    run_in_vm "sh vm/guest-bench.sh$(quote_args "$@")"
}

cmd_bench_impaired() {
    run_in_vm "sh vm/guest-impaired.sh$(quote_args "$@")"
}

case "${1:-}" in
build) shift; cmd_build "$@" ;;
test) shift; cmd_test "$@" ;;
run) shift; cmd_run "$@" ;;
bench) shift; cmd_bench "$@" ;;
bench-impaired) shift; cmd_bench_impaired "$@" ;;
check)
    reason=$(check_host)
    if [ -n "$reason" ]; then
        echo "$reason"
        exit 1
    fi
    echo "ok: this host can build and run the soft-RoCE VM"
    ;;
key) image_dir ;;
*)
    sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
