#!/usr/bin/env bash
# Builds the fuzz targets (cargo-fuzz, libFuzzer with AddressSanitizer) and runs each for
# SECONDS (default 5) on its corpus in tests/fuzz/corpus/<target>/, adding what it finds there.
# CI runs a short smoke; a real campaign gives each target at least ten minutes:
#   tests/fuzz/run.sh 600
# The toolchain here is stable: RUSTC_BOOTSTRAP lets cargo-fuzz use the sanitizer flags, and
# --cap-lints keeps h2's `deny(missing_docs)` from failing its cfg(fuzzing) module.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH="${1:-5}"
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(spiffe_id csr jwt oidc config requests records audit_chain)
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1 RUSTFLAGS="--cap-lints=warn"
cargo fuzz build -O
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "== fuzzing $t for ${SECONDS_EACH}s"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=10 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>&1 \
    | grep -E "^(stat::number_of_executed_units|stat::new_units_added|==|.*ERROR|.*panicked|SUMMARY)" || true
  # Any finding fails the run: a crash, an out-of-memory, a timeout or a leak.
  if ls "artifacts/$t"/crash-* "artifacts/$t"/oom-* "artifacts/$t"/timeout-* "artifacts/$t"/leak-* >/dev/null 2>&1; then
    echo "fuzz target $t found a problem; inputs in tests/fuzz/artifacts/$t/:" >&2
    ls "artifacts/$t" >&2
    exit 1
  fi
done
