#!/usr/bin/env bash
# Installs the Debian tools some tests drive, when missing: qemu and debootstrap, and the VM image
# (scripts/vm-image.sh: the systemd VMs), ansible-core, ansible-lint and ssh (the playbooks over SSH); and promtool, unpacked
# from Debian's prometheus package into .tidal/tools (the package itself would start a
# Prometheus server); and tritonclient and Triton's perf_analyzer, for the outside-client tests
# (scripts/client-tools.sh, into .tidal/clients); and a word list (wamerican) for the generated
# text models' tokenizers. Needs root and apt-get; without them it says
# which tests will report "SKIPPED (not run)" and succeeds, so that the rest of the suite runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .tidal/tools/bin/promtool ] && command -v apt-get >/dev/null 2>&1; then
  echo "test-deps: unpacking promtool from Debian's prometheus package into .tidal/tools"
  rm -rf .tidal/tools/deb && mkdir -p .tidal/tools/deb .tidal/tools/bin
  (cd .tidal/tools/deb && apt-get download -q prometheus >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get download -q prometheus >/dev/null; }) \
    && dpkg-deb -x .tidal/tools/deb/prometheus_*.deb .tidal/tools/deb/root \
    && ln -sf ../deb/root/usr/bin/promtool .tidal/tools/bin/promtool \
    || echo "test-deps: could not unpack promtool; the metrics format test will be reported as not run" >&2
fi

# tritonclient and perf_analyzer, for the outside-client tests (PyPI and one Debian library,
# unpacked into .tidal/clients; nothing is installed system-wide).
scripts/client-tools.sh || echo "test-deps: the tritonclient and perf_analyzer tests will be reported as not run" >&2

# The image the systemd / cgroup v2 VM tests boot (debootstrap, about 80 s), built here beside
# the build rather than by the first VM test; it installs qemu and debootstrap itself.
scripts/vm-image.sh || echo "test-deps: the VM image was not built; the VM tests will say why" >&2

declare -A provides=(
  [qemu-system-x86_64]=qemu-system-x86 [debootstrap]=debootstrap [mkfs.ext4]=e2fsprogs
  [ansible-playbook]=ansible-core [ansible-lint]=ansible-lint [ssh]=openssh-client
  [ip]=iproute2
)
missing=()
for tool in "${!provides[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${provides[$tool]}")
done
# The word list the generated text models' tokenizers take their vocabulary from.
[ -f /usr/share/dict/words ] || missing+=(wamerican)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "test-deps: cannot install ${missing[*]} (needs root and apt-get); the VM, Ansible and promtool tests will be reported as not run" >&2
  exit 0
fi
echo "test-deps: installing ${missing[*]} (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
