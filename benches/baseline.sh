#!/bin/bash
# The obvious alternative to cgtproxy, as a user on a minimal system would
# write it: `inotifywait -m -r` on the cgroup tree and one `nft add element` /
# `nft delete element` per event. The benchmark suite (benches/suite.rs) runs
# it on the same workloads as the daemon, as its baseline.
#
# usage: baseline.sh DIR
#   DIR      a directory on the cgroup2 mount (host path, e.g.
#            /sys/fs/cgroup/unified/some/subtree); every cgroup under it,
#            DIR included, gets an element that stands for VERDICT.
#   env TABLE (cgtproxy), MAP (cgroups), VMAP (verdicts),
#       VERDICT ("goto direct"), NUMBER (1000)
#            the ruleset maps a cgroup to a number (MAP) and the number to
#            its verdict (VMAP): the script puts NUMBER : VERDICT in VMAP once
#            and every cgroup's element is "PATH" : NUMBER. NUMBER is far
#            from the daemon's own (1, 2, ...), so the two never conflict.
#   env READY_FD  a descriptor that gets "\n" once the watches are in place
#                 and the cgroups that already existed are in the map.
#
# nft 1.0.6 names a cgroup (type cgroupsv2) only by its path under
# /sys/fs/cgroup, so the script runs in a private mount namespace with cgroup2
# mounted there (it re-executes itself under `unshare -m`). Consequence of
# that design, visible in the results: once a cgroup is removed its path no
# longer resolves, so `nft delete element` always fails and the element stays
# in the map for good.
#
# Needs: bash, inotifywait (inotify-tools), nft, unshare and mount
# (util-linux), find and sed. Root.
set -u

if [ -z "${BASELINE_IN_PRIVATE_MOUNT_NS:-}" ]; then
	export BASELINE_IN_PRIVATE_MOUNT_NS=1
	exec unshare -m --propagation private "$0" "$@"
fi

dir=${1:?usage: baseline.sh DIR}
table=${TABLE:-cgtproxy}
map=${MAP:-cgroups}
vmap=${VMAP:-verdicts}
verdict=${VERDICT:-goto direct}
number=${NUMBER:-1000}

# Where cgroup2 is mounted (unified or hybrid layout), and DIR relative to it.
mnt=$(awk '$0 ~ / - cgroup2 / { print $5; exit }' /proc/self/mountinfo)
[ -n "$mnt" ] || { echo "baseline.sh: no cgroup2 mount" >&2; exit 1; }
dir=$(realpath "$dir")
case $dir in
"$mnt") rel= ;;
"$mnt"/*) rel=${dir#"$mnt"/} ;;
*) echo "baseline.sh: $dir is not on the cgroup2 mount $mnt" >&2; exit 1 ;;
esac
mount -t cgroup2 cgroup2 /sys/fs/cgroup || exit 1
top=/sys/fs/cgroup${rel:+/$rel}

# Watch first, then add what exists (events queue in the pipe meanwhile).
exec {ev}< <(exec inotifywait -m -r -e create,delete --format '%e %w%f' "$top" 2>&1)
while IFS= read -r line <&"$ev"; do
	[ "$line" = "Watches established." ] && break
done

tmp=$(mktemp)
{
	printf 'add element inet %s %s { %s : %s }\n' "$table" "$vmap" "$number" "$verdict"
	printf 'add element inet %s %s {\n' "$table" "$map"
	find "$top" -type d | sed -e 's|^/sys/fs/cgroup/||' -e "s|.*|\"&\" : $number,|"
	printf '}\n'
} >"$tmp"
nft -f "$tmp"
rm -f "$tmp"
[ -n "${READY_FD:-}" ] && echo >&"$READY_FD" && exec {READY_FD}>&-

while IFS= read -r line <&"$ev"; do
	event=${line%% *}
	path=${line#* }
	path=${path#/sys/fs/cgroup/}
	case $event in
	CREATE,ISDIR) nft add element inet "$table" "$map" "{ \"$path\" : $number }" ;;
	DELETE,ISDIR) nft delete element inet "$table" "$map" "{ \"$path\" }" ;;
	esac
done
