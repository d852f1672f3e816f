#!/usr/bin/env bash
# demo.sh: annexproxy in one command.
#
#   ./demo.sh                 run the default scenario ("proxy": a proxy with two nodes and a
#                             cluster over them, a clone, and transfers through it)
#   ./demo.sh SCENARIO...     run these scenarios (./demo.sh --list names them)
#   ./demo.sh --keep ...      keep the temp tree afterwards (its path is printed)
#
# The real git-annex client (from the git-annex wheel) talks over "ssh" to repositories served
# by OUR git-annex-shell. There is no network and no sshd: tests/fakessh.py is first on the
# client's PATH as `ssh`, accepts only loopback hosts, and runs the remote command the way an
# authorized_keys forced command would, `git-annex-shell -c "$SSH_ORIGINAL_COMMAND"`, with a
# server PATH on which `git-annex-shell` is ours. Everything happens in a temp dir.
#
# On a fresh machine it first creates .venv (python3 -m venv, pip install -e '.[test]'); the
# test extra brings the git-annex wheel, which is the client here.
#
# Exit status: 0 when every scenario passed (last line "demo ok: ..."), non-zero otherwise.
#
# DEMO_SHELL=/path/to/git-annex-shell runs the same demo against another git-annex-shell, e.g.
# git-annex's own (a symlink named git-annex-shell to the wheel's git_annex/git-annex binary),
# to compare.
#
# Adding a scenario (e.g. a proxy in front of nodes): write a function scenario_NAME that uses
# the helpers below (make_server_repo, clone, add_files, check_hashes, ...), add NAME to
# SCENARIOS, and end it with `passed "one line about what was shown"`.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${ANNEXPROXY_VENV:-$here/.venv}
server_shell=${DEMO_SHELL:-}
SCENARIOS=(proxy plain)
DEFAULT_SCENARIO=proxy
BIG_MIB=20

keep=0
chosen=()
for arg in "$@"; do
    case $arg in
        --keep) keep=1 ;;
        --list) printf '%s\n' "${SCENARIOS[@]}"; exit 0 ;;
        -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        -*) echo "demo: unknown option $arg (try --help)" >&2; exit 2 ;;
        *) chosen+=("$arg") ;;
    esac
done
((${#chosen[@]})) || chosen=("$DEFAULT_SCENARIO")
for name in "${chosen[@]}"; do
    if [[ " ${SCENARIOS[*]} " != *" $name "* ]]; then
        echo "demo: no scenario '$name' (have: ${SCENARIOS[*]})" >&2
        exit 2
    fi
done

# -- output -----------------------------------------------------------------------------------

current_step="start-up"
step_no=0
if [ -t 1 ]; then bold=$'\033[1m' normal=$'\033[0m'; else bold="" normal=""; fi
step() {
    step_no=$((step_no + 1))
    current_step=$*
    printf '\n%s== %d. %s%s\n' "$bold" "$step_no" "$*" "$normal"
}
note() { printf '   %s\n' "$*"; }
fail() { echo "demo: FAILED: $*" >&2; exit 1; }

# show CMD...: print the command (who runs it, then its words shell-quoted), run it, and indent
# its output so that the steps stay readable. git-annex warns on every command that ssh
# connection caching is off (it is off on purpose: there is no real ssh); that noise is cut,
# as are pip's warnings about index locations of this machine, and progress bars redrawn
# with \r (only the last state of a line is kept).
show() {
    local who=""
    case $1 in
        client) who="client" ;;
        admin) who="server admin" ;;
        bare_client) who="client without git-annex" ;;
    esac
    if [ -n "$who" ]; then
        printf '   [%s]$' "$who"
        printf ' %q' "${@:2}"
    else
        printf '   $'
        printf ' %q' "$@"
    fi
    printf '\n'
    local rc=0
    "$@" 2>&1 | { grep -v -e 'You have enabled concurrency, but git-annex is not able to use ssh' \
        -e 'annex.sshcaching is not set to true' \
        -e "^WARNING: Location '.*' is ignored" || true; } |
        sed -e 's/.*\r//' -e '/^ *$/d' -e 's/^/     /' ||
        rc=$?
    # The command's own status, not the filter's (with pipefail, rc is set from it too).
    return "$rc"
}

# -- the Python environment (our git-annex-shell and the real git-annex client) ---------------

ensure_venv() {
    command -v git >/dev/null || fail "git is not installed"
    if [ ! -x "$venv/bin/python" ]; then
        step "create $venv (first run only)"
        show python3 -m venv "$venv"
        show "$venv/bin/pip" install -q -e "${here}[test]"
    fi
    [ -x "$venv/bin/git-annex" ] || fail "$venv/bin/git-annex missing: run $venv/bin/pip install -e '${here}[test]'"
    # The git-annex wheel installs a git-annex-shell wrapper of its own, and whichever package
    # pip installed last owns the name. The demo must run ours, so put ours back if needed.
    if ! grep -q 'shell\.cli' "$venv/bin/git-annex-shell" 2>/dev/null; then
        step "reinstall annexproxy's git-annex-shell over the git-annex wheel's"
        show "$venv/bin/pip" install -q --no-deps --force-reinstall -e "$here"
        grep -q 'shell\.cli' "$venv/bin/git-annex-shell" || fail "$venv/bin/git-annex-shell is not ours"
    fi
    if [ -z "$server_shell" ]; then
        server_shell=$venv/bin/git-annex-shell
        shell_name="annexproxy's git-annex-shell"
    else
        shell_name=$server_shell
    fi
}

# -- the fake world: a client and a "server" on this machine ----------------------------------

# Lays out $world (bin/ssh, srvbin/git-annex-shell, both homes, srv/, cli/).
make_world() {
    world=$(mktemp -d "${TMPDIR:-/tmp}/annexproxy-demo.XXXXXX")
    mkdir -p "$world"/{bin,srvbin,home-client,home-server,srv,cli}
    ln -s "$here/tests/fakessh.py" "$world/bin/ssh"
    # Only our git-annex-shell in srvbin: it must come before the wheel's in $venv/bin.
    ln -s "$server_shell" "$world/srvbin/git-annex-shell"
    for home in home-client home-server; do
        # No ssh connection caching: there is no real ssh to cache.
        cat >"$world/$home/.gitconfig" <<'EOF'
[user]
	name = annexproxy demo
	email = demo@annexproxy.invalid
[init]
	defaultBranch = main
[annex]
	sshcaching = false
EOF
    done
}

# client_on PATH CMD...: run a command as the client, in a clean environment with PATH
# (the fake ssh first) and the fake sshd's settings.
client_on() {
    local path=$1
    shift
    env -i \
        HOME="$world/home-client" USER="${USER:-demo}" LANG=C.UTF-8 LC_ALL=C.UTF-8 TZ=UTC \
        PATH="$path" GIT_CONFIG_NOSYSTEM=1 \
        FAKESSH_MODE="${FAKESSH_MODE:-forced}" \
        FAKESSH_SERVER_ENV="${FAKESSH_SERVER_ENV:-}" \
        FAKESSH_SERVER_HOME="$world/home-server" \
        FAKESSH_SERVER_PATH="$world/bin:$world/srvbin:$venv/bin:/usr/bin:/bin" \
        FAKESSH_LOG="$world/ssh.jsonl" \
        "$@"
}

# Run a command as the client with git-annex (the venv's) on PATH.
client() { client_on "$world/bin:$venv/bin:/usr/local/bin:/usr/bin:/bin" "$@"; }

# Run a command as the server's administrator, with the real git and git-annex only.
admin() {
    env -i \
        HOME="$world/home-server" USER="${USER:-demo}" LANG=C.UTF-8 LC_ALL=C.UTF-8 TZ=UTC \
        PATH="$venv/bin:/usr/local/bin:/usr/bin:/bin" GIT_CONFIG_NOSYSTEM=1 \
        "$@"
}

# make_server_repo NAME DESCRIPTION: a bare repo under srv/, initialised by the real git-annex.
make_server_repo() {
    local repo="$world/srv/$1"
    show admin git init --quiet --bare "$repo"
    (cd "$repo" && show admin git annex init --quiet "$2")
}

# add_files DIR: a few files of different kinds, one of $BIG_MIB MiB; hashes go to DIR.sha256.
add_files() {
    local dir=$1
    mkdir -p "$dir/docs/nested"
    printf 'hello from annexproxy\n' >"$dir/hello.txt"
    printf 'a name with spaces\n' >"$dir/docs/name with spaces.txt"
    printf 'déjà vu\n' >"$dir/docs/nested/unicode-é.txt"
    head -c $((BIG_MIB * 1024 * 1024)) /dev/urandom >"$dir/big.bin"
    (cd "$dir" && find . -path ./.git -prune -o -type f -print0 | sort -z | xargs -0 sha256sum) \
        >"$dir.sha256"
    note "$(wc -l <"$dir.sha256") files, $(du -sh --apparent-size "$dir/big.bin" | cut -f1) the biggest"
}

# check_hashes DIR: the work tree's files have the hashes add_files recorded.
check_hashes() {
    (cd "$1" && sha256sum --quiet --check "$1.sha256") || fail "content differs in $1"
    note "all $(wc -l <"$1.sha256") files match their sha256"
}

# check_server_objects CLIENTDIR REPO: every annexed file's object on the server has the
# right hash (found with the real git-annex on the server side).
check_server_objects() {
    local dir=$1 repo=$2 file key obj want got
    while read -r want file; do
        file=${file#./}
        key=$(cd "$dir" && client git annex lookupkey "$file")
        obj=$(cd "$repo" && admin git annex contentlocation "$key") || fail "server lacks $file ($key)"
        [[ $obj == /* ]] || obj=$repo/$obj
        got=$(sha256sum <"$obj" | cut -d' ' -f1)
        [ "$got" = "$want" ] || fail "server object of $file has sha256 $got, want $want"
    done <"$dir.sha256"
    note "the server holds every object, with the right sha256"
}

results=()
passed() { results+=("$1"); }

# -- scenarios --------------------------------------------------------------------------------

# plain: one bare repository served by our git-annex-shell; the whole content round trip.
scenario_plain() {
    local repo="$world/srv/repo.git" work="$world/cli/work" uuid

    step "plain: a bare repository on the server, initialised with the real git-annex"
    make_server_repo repo.git "demo server"
    uuid=$(admin git -C "$repo" config annex.uuid)
    note "server annex.uuid=$uuid"
    note "the server runs $shell_name ($(readlink "$world/srvbin/git-annex-shell"))"

    step "plain: clone it over ssh (git-upload-pack through our git-annex-shell and git-shell)"
    show client git clone --quiet "localhost:$repo" "$work"
    note "(the repository has no commit yet, hence git's warning about HEAD)"

    step "plain: git annex init in the clone (asks the server for its uuid with configlist)"
    (cd "$work" && show client git annex init "demo client")
    [ "$(client git -C "$work" config remote.origin.annex-uuid)" = "$uuid" ] ||
        fail "the client did not learn the server's uuid"
    note "remote.origin.annex-uuid=$uuid"

    step "plain: add files, one of $BIG_MIB MiB"
    add_files "$work"
    (cd "$work" && show client git annex add --quiet . && show client git commit --quiet -m "demo files")

    step "plain: git annex copy --to origin (P2P protocol over ssh: p2pstdio)"
    (cd "$work" && show client git annex copy --to origin .)
    check_server_objects "$work" "$repo"

    step "plain: drop the local copies (the server proves it holds them: LOCKCONTENT)"
    (cd "$work" && show client git annex drop .)
    [ -z "$(cd "$work" && client git annex find --in here)" ] || fail "content is still here after drop"
    note "no content left in the clone"

    step "plain: git annex get (content back from the server)"
    (cd "$work" && show client git annex get .)
    check_hashes "$work"

    step "plain: git annex whereis"
    (cd "$work" && show client git annex whereis)
    local on_origin
    on_origin=$(cd "$work" && client git annex find --in origin | wc -l)
    [ "$on_origin" -eq "$(wc -l <"$work.sha256")" ] || fail "only $on_origin files are on origin"

    passed "plain: $(wc -l <"$work.sha256") files ($BIG_MIB MiB the largest) copied to origin through $shell_name, dropped, got back, hashes match"
}

# proxy: a proxy repository in front of two node repositories, which also form a cluster;
# the client has one ssh remote (the proxy) and reaches every repository behind it.
scenario_proxy() {
    local proxy="$world/srv/proxy.git" work="$world/cli/proxywork" n

    step "proxy: the admin makes a proxy and two nodes (real git-annex), and a cluster of them"
    make_server_repo proxy.git "demo proxy"
    make_server_repo node1.git "node1"
    make_server_repo node2.git "node2"
    for n in node1 node2; do
        show admin git -C "$proxy" remote add "$n" "$world/srv/$n.git"
        show admin git -C "$proxy" config "remote.$n.annex-proxy" true
        show admin git -C "$proxy" config "remote.$n.annex-cluster-node" demo
    done
    (cd "$proxy" && show admin git annex sync --quiet --no-content node1 node2 &&
        show admin git annex initcluster demo &&
        show admin git annex updatecluster)

    step "proxy: clone the proxy and discover what is behind it (git-annex branch: proxy.log)"
    show client git clone --quiet "localhost:$proxy" "$work"
    (cd "$work" && show client git annex init "demo client")
    (cd "$work" && client git annex info --fast) | grep -e ' -- ' | sed 's/^/     /'
    (cd "$work" && client git annex info --fast) | grep -q 'origin-node1' ||
        fail "the client does not see origin-node1 behind the proxy"

    step "proxy: add files, one of $BIG_MIB MiB; copy them to the cluster (fan-out to both nodes)"
    add_files "$work"
    (cd "$work" && show client git annex add --quiet . && show client git commit --quiet -m "demo files" &&
        show client git annex copy --to origin-demo .)
    check_server_objects "$work" "$world/srv/node1.git"
    check_server_objects "$work" "$world/srv/node2.git"

    step "proxy: drop from node1 only, through the proxy (origin-node1)"
    (cd "$work" && show client git annex drop --from origin-node1 big.bin)
    local key
    key=$(cd "$work" && client git annex lookupkey big.bin)
    if (cd "$world/srv/node1.git" && admin git annex contentlocation "$key" >/dev/null 2>&1); then
        fail "node1 still holds big.bin"
    fi
    note "node1 no longer holds big.bin; node2 still does"

    step "proxy: drop locally (nodes lock the content through the proxy), get back from the cluster"
    (cd "$work" && show client git annex drop . && show client git annex get --from origin-demo .)
    check_hashes "$work"
    (cd "$work" && show client git annex whereis big.bin)

    passed "proxy: $(wc -l <"$work.sha256") files ($BIG_MIB MiB the largest) through $shell_name as a proxy and cluster gateway to two nodes, dropped, got back from the cluster, hashes match"

    scenario_nogitannex "$proxy" "$work"
}

# Run a command as a client that has no git-annex at all: only git, ssh and our two programs.
bare_client() {
    local only="$world/annexproxy-only"
    if [ ! -d "$only" ]; then
        mkdir -p "$only"
        ln -s "$venv/bin/git-annexproxy" "$venv/bin/git-remote-annexproxy" "$only/"
    fi
    client_on "$world/bin:$only:/usr/bin:/bin" "$@"
}

# The same proxy, from a clone made by git-remote-annexproxy on a client without git-annex:
# it annexes new files itself, pushes, uploads them to the cluster and gets content back.
scenario_nogitannex() {
    local proxy=$1 work=$2 light="$world/cli/light"
    step "client without git-annex: git clone annexproxy::ssh://... and see what is behind it"
    ! bare_client sh -c 'command -v git-annex' >/dev/null || fail "git-annex is on the light client's PATH"
    (cd "$work" && show client git push --quiet origin main)
    show bare_client git clone --quiet "annexproxy::ssh://localhost$proxy" "$light"
    (cd "$light" && show bare_client git annexproxy info)

    step "client without git-annex: git annexproxy get (content from the cluster)"
    (cd "$light" && show bare_client git annexproxy get -J 2 .)
    cmp -s "$light/big.bin" "$work/big.bin" || fail "big.bin differs after git annexproxy get"

    step "client without git-annex: git annexproxy add, commit, push, copy --to the cluster"
    mkdir -p "$light/results"
    printf 'measured on the light client\n' >"$light/results/summary.txt"
    head -c $((2 * 1024 * 1024)) /dev/urandom >"$light/results/raw.bin"
    (cd "$light" && show bare_client git annexproxy add results &&
        show bare_client git commit --quiet -m "results" &&
        show bare_client git push --quiet origin HEAD:main &&
        show bare_client git annexproxy copy --to origin-demo results)

    step "the real git-annex client pulls and gets the light client's files from the cluster"
    (cd "$work" && show client git fetch --quiet origin &&
        show client git merge --quiet --ff-only origin/main &&
        show client git annex get --from origin-demo results)
    cmp -s "$light/results/raw.bin" "$work/results/raw.bin" || fail "results/raw.bin differs"
    note "results/ arrived byte for byte through the cluster"

    passed "no git-annex on the client: clone through the proxy, get from the cluster, add + push + copy --to the cluster; the real git-annex got those files back"
}

# -- main -------------------------------------------------------------------------------------

world=""
finish() {
    local rc=$?
    if ((rc != 0)); then
        echo >&2
        echo "demo: FAILED during step $step_no: $current_step (exit $rc)" >&2
        [ -n "$world" ] && echo "demo: the temp tree is kept for inspection: $world" >&2
    elif [ -n "$world" ]; then
        if ((keep)); then echo "# kept $world"; else rm -rf "$world"; fi
    fi
}
trap finish EXIT

ensure_venv
make_world
note "temp tree: $world"
for name in "${chosen[@]}"; do
    "scenario_$name"
done
echo
for line in "${results[@]}"; do
    echo "demo ok: $line"
done
