#!/usr/bin/env bash
# Install asd with its test extra (pinned by constraints.txt), start a moto S3 server on 127.0.0.1,
# run the test suite. Run it inside a virtualenv (.ci/run makes a new one).
#   bash scripts/test.sh                # everything, slow tests included (23-33 min on 2 cores)
#   bash scripts/test.sh -m "not slow"  # the quick target (a few minutes); extra arguments go to pytest
# The install is skipped when this interpreter already has this checkout installed with the same
# pyproject.toml and constraints.txt (ASD_REINSTALL=1 forces it).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WANT="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1) $PWD"
STAMP="$("$PYTHON" -c 'import sys; print(sys.prefix)')/.asd-test-install"
installed_here() {
  [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] &&
    [ "$("$PYTHON" -c 'import asd, moto, pytest, os; print(os.path.dirname(os.path.dirname(asd.__file__)))' 2>/dev/null)" = "$PWD" ]
}
if [ "${ASD_REINSTALL:-0}" != 0 ] || ! installed_here; then
  echo "installing asd[test] into $("$PYTHON" -c 'import sys; print(sys.prefix)') (constraints.txt)"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]" -c constraints.txt
  echo "$WANT" > "$STAMP"
else
  echo "asd[test] already installed from this checkout (same pyproject.toml and constraints.txt); not reinstalling"
fi

export RAY_AUTH_MODE=disabled            # Ray token auth: off for local test clusters only
export RAY_USAGE_STATS_ENABLED=0
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export AWS_REQUEST_CHECKSUM_CALCULATION=when_required AWS_RESPONSE_CHECKSUM_VALIDATION=when_required

# moto S3 server shared by every test (tests that need S3 use AWS_ENDPOINT_URL)
PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$PYTHON" -m moto.server -H 127.0.0.1 -p "$PORT" >/tmp/asd-moto-$PORT.log 2>&1 &
MOTO_PID=$!
trap 'kill $MOTO_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if "$PYTHON" -c "import socket,sys; socket.create_connection(('127.0.0.1',$PORT),1)" 2>/dev/null; then break; fi
  sleep 0.2
done
export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT"
echo "moto S3 server on $AWS_ENDPOINT_URL (pid $MOTO_PID)"

"$PYTHON" -m pytest -p no:cacheprovider --timeout=900 "$@"
