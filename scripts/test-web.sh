#!/usr/bin/env bash
# The browser tests: builds web/ (scripts/build-web.sh), installs playwright-core (tests/web,
# from its lock file, without any browser download) and runs tests/web/run.mjs in Debian's
# headless chromium, whose WebGPU runs on its software adapter. scripts/test.sh calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null || need+=(chromium)
command -v node >/dev/null || need+=(nodejs npm)
if ((${#need[@]})); then
  sudo=()
  [[ $(id -u) -ne 0 ]] && sudo=(sudo)
  echo "test-web: installing ${need[*]}" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

bash scripts/build-web.sh
(cd tests/web && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
node tests/web/run.mjs "$@"
