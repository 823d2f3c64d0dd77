#!/usr/bin/env bash
# Builds the XDP ChannelData router (xdp/bpf/turn_router.c) into the object the uturn-xdp crate
# embeds (xdp/bpf/turn_router.o, committed so that `cargo test --workspace` needs no clang).
#   scripts/build-xdp.sh           rebuild and overwrite the committed object
#   scripts/build-xdp.sh --check   rebuild into a temporary file and fail if it differs (CI)
# Debian's clang (14 on bookworm) and libbpf-dev's headers. The output is byte-for-byte
# reproducible: the same source gives the same object in any directory, because the debug
# info's directory is mapped to "." (checked by building from two directories).
set -euo pipefail
cd "$(dirname "$0")/../xdp/bpf"
check=0
[[ "${1:-}" == "--check" ]] && check=1
out=turn_router.o
if (( check )); then out=$(mktemp --suffix=.o); trap 'rm -f "$out"' EXIT; fi
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
clang -O2 -g -target bpf -Wall -Werror \
  -I"/usr/include/$multiarch" \
  -fdebug-prefix-map="$PWD=." \
  -c turn_router.c -o "$out"
if (( check )); then
  if ! cmp -s "$out" turn_router.o; then
    echo "xdp/bpf/turn_router.o is not the build of turn_router.c with $(clang --version | head -1)" >&2
    echo "run scripts/build-xdp.sh and commit the object" >&2
    exit 1
  fi
  echo "xdp/bpf/turn_router.o matches its source"
fi
