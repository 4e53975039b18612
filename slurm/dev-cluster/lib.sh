# Shared by up.sh and down.sh (sourced).
# A zombie still answers `kill -0` and `pgrep`: judge a process by its state instead.
alive() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1; [ -n "$st" ] && [ "$st" != Z ]; }
# Live (non-zombie) pids of processes named exactly $1.
live_pids() { local pid; for pid in $(pgrep -x "$1" 2>/dev/null); do alive "$pid" && echo "$pid"; done; }
log() { echo "[dev-cluster] $*" >&2; }
