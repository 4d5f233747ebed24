#!/bin/sh
# Builds palisade-tc-guard's BPF objects for the bench pods into $1 (no clang here: the program is
# hand-written LLVM IR, compiled by llc). `pass` is the control: the same hook, a program that
# passes everything. Then: PALISADE_BENCH_TC_GUARD=$1 target/release/datapath-bench run \
#   --policies 1000 --systems palisade-tc-guard,palisade-no-source-guard --alternate ...
set -eu
out=$1; here=$(dirname "$0"); mkdir -p "$out" "$out/pass"
for ip in 10.244.1.10 10.244.2.10; do
  # The address as the little-endian u32 its network-order bytes load as.
  v=$(python3 -c "import ipaddress,struct,sys; print(struct.unpack('<I', ipaddress.ip_address(sys.argv[1]).packed)[0])" "$ip")
  sed "s/@ADDR@/$v/" "$here/guard.ll.in" > "$out/guard-$ip.ll"
  llc -opaque-pointers -march=bpf -filetype=obj "$out/guard-$ip.ll" -o "$out/guard-$ip.o"
  llc -opaque-pointers -march=bpf -filetype=obj "$here/pass.ll" -o "$out/pass/guard-$ip.o"
done
