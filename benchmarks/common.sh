# Sourced by the benchmark scripts.

# The events/s figure of a `rampart replay` summary.
rate_of() { sed -n 's/.*(\([0-9]*\) events\/s).*/\1/p' <<<"$1"; }

# The median of its arguments (numbers).
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# One line for a result file: CPU model, cores, memory, build.
machine_line() {
  local cpu mem
  cpu=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
  mem=$(free -g | awk '/Mem:/ {print $2 " GiB"}')
  echo "Machine: $cpu, $(nproc) cores, $mem. Build: release (\`cargo build --release --workspace --all-targets\`)."
}

# generated FILE ARGS...: makes FILE with benchmarks/generate.py ARGS unless it already exists
# (generated inputs are cached in ~/.cache/rampart/bench and reused across runs).
generated() {
  local file=$1
  shift
  mkdir -p "$(dirname "$file")"
  [ -s "$file" ] || python3 benchmarks/generate.py "$@" --out "$file"
}
