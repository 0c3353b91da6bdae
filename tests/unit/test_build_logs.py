"""Image builds: the log file, a line per step, and a failure summary that names the fix."""

import subprocess
import sys
from pathlib import Path

import pytest

from stack import build, common

# Excerpts of real build logs (Docker's classic builder; pip 25 and apt in Debian trixie).
PIP_TLS_INTERCEPTED = """\
Step 12/22 : RUN ./install-env.sh "${MLFLOW_VARIANT}" /opt/mlflow/venv "${MLFLOW_VERSION}"  && useradd --system mlflow
 ---> Running in 4d8dc5b94604
\x1b[91mWARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection broken by 'SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate in certificate chain (_ssl.c:1029)'))': /simple/mlflow/
\x1b[0mCould not fetch URL https://pypi.org/simple/mlflow/: There was a problem confirming the ssl certificate: HTTPSConnectionPool(host='pypi.org', port=443): Max retries exceeded with url: /simple/mlflow/ (Caused by SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate in certificate chain (_ssl.c:1029)'))) - skipping
\x1b[91mERROR: Cannot install mlflow==3.17.2 because these package versions have conflicting dependencies.
\x1b[0m
The conflict is caused by:
    The user requested mlflow==3.17.2
    The user requested (constraint) mlflow==3.17.2

To fix this you could try to:
1. loosen the range of package versions you've specified
2. remove package versions to allow pip to attempt to solve the dependency conflict

\x1b[91mERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/#dealing-with-dependency-conflicts
\x1b[0mThe command '/bin/bash -o pipefail -c ./install-env.sh "${MLFLOW_VARIANT}" /opt/mlflow/venv "${MLFLOW_VERSION}"' returned a non-zero code: 1
"""

PIP_NO_NETWORK = """\
#9 [5/8] RUN ./install-env.sh pip /opt/mlflow/venv ""
#9 1.204 WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f6cba36d6a0>: Failed to establish a new connection: [Errno -3] Temporary failure in name resolution')': /simple/mlflow/
#9 9.871 ERROR: Could not find a version that satisfies the requirement mlflow==3.17.2 (from versions: none)
#9 9.872 ERROR: No matching distribution found for mlflow==3.17.2
#9 ERROR: process "/bin/bash -o pipefail -c ./install-env.sh pip /opt/mlflow/venv" did not complete successfully: exit code: 1
failed to solve: process "/bin/bash -o pipefail -c ./install-env.sh" did not complete successfully: exit code: 1
"""

PIP_PROXY_DOWN = """\
WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection broken by 'ProxyError('Cannot connect to proxy.', NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f1>: Failed to establish a new connection: [Errno 111] Connection refused'))': /simple/boto3/
ERROR: Could not find a version that satisfies the requirement boto3==1.40.1 (from versions: none)
"""

APT_NO_NETWORK = """\
Step 2/8 : RUN apt-get update  && apt-get install -y --no-install-recommends python3 python3-boto3
 ---> Running in 0c1d2e3f4a5b
Ign:1 http://deb.debian.org/debian trixie InRelease
Err:1 http://deb.debian.org/debian trixie InRelease
  Temporary failure resolving 'deb.debian.org'
W: Failed to fetch http://deb.debian.org/debian/dists/trixie/InRelease  Temporary failure resolving 'deb.debian.org'
W: Some index files failed to download. They have been ignored, or old ones used instead.
Reading package lists...
E: Unable to locate package python3-boto3
The command '/bin/sh -c apt-get update  && apt-get install -y --no-install-recommends python3 python3-boto3' returned a non-zero code: 100
"""

CURL_TLS = "curl: (60) SSL certificate problem: unable to get local issuer certificate\n"

REAL_CONFLICT = """\
Step 12/22 : RUN ./install-env.sh pip /opt/mlflow/venv 3.99.0
Collecting mlflow==3.99.0 (from mlflow[auth]==3.99.0->-r requirements.txt (line 1))
ERROR: Could not find a version that satisfies the requirement mlflow==3.99.0 (from versions: 3.16.1, 3.17.2)
ERROR: No matching distribution found for mlflow==3.99.0
The command '/bin/bash -o pipefail -c ./install-env.sh pip /opt/mlflow/venv 3.99.0' returned a non-zero code: 1
"""


def test_certificate_failure_names_build_ca_cert_with_the_system_bundle():
    summary = build.summarize(PIP_TLS_INTERCEPTED, system_ca=Path("/etc/ssl/certs/ca-certificates.crt"))
    assert len(summary) == 2
    assert "TLS certificate of pypi.org" in summary[0] and "intercepts TLS" in summary[0]
    assert summary[1].strip() == "BUILD_CA_CERT=/etc/ssl/certs/ca-certificates.crt ./stack_deploy.sh"
    assert "ResolutionImpossible" not in " ".join(summary)


def test_certificate_failure_without_a_system_bundle_asks_for_the_proxy_ca():
    summary = build.summarize(CURL_TLS)
    assert "BUILD_CA_CERT=/path/to/proxy-ca.pem" in summary[-1]


def test_certificate_failure_despite_a_ca_asks_for_the_right_one():
    summary = build.summarize(PIP_TLS_INTERCEPTED, system_ca=Path("/etc/ssl/cert.pem"),
                              ca_in_use=Path("/etc/pip/ca.pem"))
    assert "even with the extra CA /etc/pip/ca.pem" in summary[0]
    assert "/etc/ssl/cert.pem" not in " ".join(summary)


def test_no_network_for_pip_names_the_index():
    (line,) = build.summarize(PIP_NO_NETWORK)
    assert "could not reach the Python package index" in line
    assert "Temporary failure in name resolution" in line and "proxies" in line


def test_a_proxy_that_is_down_is_a_network_failure():
    (line,) = build.summarize(PIP_PROXY_DOWN)
    assert "could not reach" in line and "Cannot connect to proxy" in line


def test_no_network_for_apt_names_the_mirror():
    (line,) = build.summarize(APT_NO_NETWORK)
    assert line.startswith("The build could not reach deb.debian.org: Temporary failure resolving.")


def test_other_failures_end_with_the_last_real_errors():
    assert build.summarize(REAL_CONFLICT) == [
        "ERROR: Could not find a version that satisfies the requirement mlflow==3.99.0 (from versions: 3.16.1, 3.17.2)",
        "ERROR: No matching distribution found for mlflow==3.99.0"]
    assert build.summarize("Step 1/2 : FROM x\nCOPY failed: file not found in build context\n") == [
        "COPY failed: file not found in build context"]
    assert build.summarize("") == ["(the build printed nothing)"]


def test_a_line_per_step_for_both_builders():
    seen: set = set()
    lines = ["Step 3/22 : FROM ${MLFLOW_BASE_IMAGE}", " ---> 2c528443faf0", "#7 [2/8] RUN apt-get update",
             "#7 1.23 Get:1 http://deb.debian.org/debian trixie InRelease", "#7 [2/8] RUN apt-get update",
             "#8 [3/8] COPY stack/ /opt/", "#8 DONE 0.1s"]
    shown = [build.progress(line, seen) for line in lines]
    assert [s for s in shown if s] == ["Step 3/22 : FROM ${MLFLOW_BASE_IMAGE}", "[2/8] RUN apt-get update",
                                       "[3/8] COPY stack/ /opt/"]


def test_a_failed_build_logs_everything_and_ends_with_the_fix(tmp_path, monkeypatch, capsys):
    fake_compose = [sys.executable, "-c", "import sys; sys.stdout.write(sys.argv[1]); sys.exit(1)",
                    PIP_TLS_INTERCEPTED]
    monkeypatch.setattr(build.compose, "invocation", lambda environ=None: (list(fake_compose), {}))
    monkeypatch.setattr(common, "system_ca_bundle", lambda: Path("/etc/ssl/certs/ca-certificates.crt"))
    environ = {"STACK_ENV_FILE": str(tmp_path / ".env"), "COMPOSE_PROJECT_NAME": "unitbuild"}
    assert build.run("mlflow", environ) == 1
    err = capsys.readouterr().err
    log = tmp_path / ".stack-state" / "unitbuild" / "build-mlflow.log"
    assert "\x1b[" not in log.read_text() and "ResolutionImpossible" in log.read_text()
    assert "    Step 12/22 : RUN ./install-env.sh" in err
    assert f"the whole log: {log}" in err
    assert err.rstrip().splitlines()[-1] == "  BUILD_CA_CERT=/etc/ssl/certs/ca-certificates.crt ./stack_deploy.sh"


def test_a_good_build_says_where_its_log_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build.compose, "invocation", lambda environ=None: (
        [sys.executable, "-c", "print('Step 1/1 : FROM scratch')"], {}))
    environ = {"STACK_ENV_FILE": str(tmp_path / ".env"), "COMPOSE_PROJECT_NAME": "unitbuild"}
    assert build.run("backup", environ) == 0
    err = capsys.readouterr().err
    assert "Step 1/1 : FROM scratch" in err and "build-backup.log" in err


# --- The extra CA for builds ---------------------------------------------------

def pip_config(stdout, returncode=0):
    return lambda *args, **kwargs: subprocess.CompletedProcess(args, returncode, stdout=stdout, stderr="")


@pytest.fixture
def ca(tmp_path):
    path = tmp_path / "corp-ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return path


def test_build_ca_cert_wins_and_must_be_readable(ca, tmp_path):
    assert build.build_ca({"BUILD_CA_CERT": str(ca), "PIP_CERT": "/x"}, pip_config("")) == (ca, "")
    with pytest.raises(build.BuildError, match="BUILD_CA_CERT=.*cannot be read"):
        build.build_ca({"BUILD_CA_CERT": str(tmp_path / "missing.pem")}, pip_config(""))


def test_the_ca_of_this_machines_pip_is_used_and_said(ca):
    found, note = build.build_ca({}, pip_config(f"global.cert='{ca}'\nglobal.timeout='60'\n"))
    assert found == ca and "pip config global.cert" in note and str(ca) in note and "BUILD_CA_CERT" in note


@pytest.mark.parametrize("environ_key", ["PIP_CERT", "REQUESTS_CA_BUNDLE"])
def test_pip_cert_and_requests_bundle_count(ca, environ_key):
    found, note = build.build_ca({environ_key: str(ca)}, pip_config("", returncode=1))
    assert found == ca and environ_key in note


def test_no_configured_ca_means_none(tmp_path):
    assert build.build_ca({"PIP_CERT": str(tmp_path / "gone.pem")}, pip_config("global.index-url='x'\n")) == (None, "")


def test_the_ca_is_copied_only_when_it_changed(ca, tmp_path):
    dest = tmp_path / "certs" / "build-ca.crt"
    build.install_ca(ca, dest)
    assert dest.read_text() == ca.read_text()
    stamp = dest.stat().st_mtime_ns
    build.install_ca(ca, dest)
    assert dest.stat().st_mtime_ns == stamp
