"""AI-gateway secrets: stored through the API, read back decrypted inside the
server's container (the API only ever returns them masked)."""

from __future__ import annotations

import json

# Runs in the mlflow container: the stack's own settings code finds the
# database and the key file; MLflow's store decrypts as the server would.
READ_BACK = r"""
import json, os, sys
sys.path.insert(0, "/opt/mlflow")
from stack import common
os.environ["MLFLOW_CRYPTO_KEK_PASSPHRASE"] = common.secret("MLFLOW_CRYPTO_KEK_PASSPHRASE")
import sqlalchemy as sa
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.utils.crypto import DEFAULT_KEK_PASSPHRASE, KEKManager, unwrap_dek
uri = common.database_uri()
engine = sa.create_engine(uri)
with engine.connect() as conn:
    row = conn.execute(sa.text("SELECT secret_id, wrapped_dek, kek_version FROM secrets WHERE secret_name = :n"),
                       {"n": sys.argv[1]}).one()
try:
    unwrap_dek(bytes(row[1]), KEKManager(passphrase=DEFAULT_KEK_PASSPHRASE, kek_version=row[2]).get_kek())
    builtin = "opens"
except Exception:
    builtin = "refused"
try:
    value = SqlAlchemyStore(uri, "/tmp/unused")._get_decrypted_secret(row[0])
except Exception:
    value = None  # not under this installation's key
print(json.dumps({"value": value, "builtin_key": builtin}))
"""


# As an installation did before the stack set MLFLOW_CRYPTO_KEK_PASSPHRASE:
# MLflow falls back to its built-in passphrase.
WRITE_UNDER_BUILTIN_KEY = r"""
import os, sys
sys.path.insert(0, "/opt/mlflow")
from stack import common
os.environ.pop("MLFLOW_CRYPTO_KEK_PASSPHRASE", None)
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
SqlAlchemyStore(common.database_uri(), "/tmp/unused").create_gateway_secret(
    sys.argv[1], {"api_key": sys.argv[2]}, provider="openai")
"""


def create_under_builtin_key(stack, name: str, value: str) -> None:
    stack.compose("exec", "-T", "mlflow", "python3", "-c", WRITE_UNDER_BUILTIN_KEY, name, value)
    assert read_back(stack, name) == {"value": None, "builtin_key": "opens"}


def create(stack, name: str, value: str) -> None:
    response = stack.http("POST", "/api/3.0/mlflow/gateway/secrets/create",
                          json={"secret_name": name, "secret_value": {"api_key": value}, "provider": "openai"})
    assert response.status_code == 200, response.text
    assert value not in response.text, "the API must answer with the masked value only"


def read_back(stack, name: str) -> dict:
    """{"value": the secret decrypted with the installation's key (None if that fails),
    "builtin_key": "refused" unless MLflow's built-in key opens it}."""
    out = stack.compose("exec", "-T", "mlflow", "python3", "-c", READ_BACK, name).stdout
    return json.loads(out.strip().splitlines()[-1])
