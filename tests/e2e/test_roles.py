"""Least privilege in PostgreSQL, on the shared deployment: the server logs in as a role of
its own (stack_server) that may read and write MLflow's rows but is no superuser, may not
change the schema, run programs or read files; the migrate job that made it changes nothing
when it runs again."""

from __future__ import annotations

from stack import common


def as_role(stack, role: str, password: str, sql: str, db: str | None = None):
    """psql as ROLE over TCP inside the db container; the password on stdin, not in argv."""
    db = db or stack.values()["POSTGRES_DB"]
    return stack.compose("exec", "-T", "db", "sh", "-c",
                         f'PGPASSWORD="$(cat)" psql -h 127.0.0.1 -U {role} -d {db} -v ON_ERROR_STOP=1 -Atc "{sql}"',
                         stdin=password, check=False)


def test_the_server_logs_in_as_a_role_that_may_change_rows_only(stack):
    values = stack.values()
    db = values["POSTGRES_DB"]
    assert stack.http("GET", "/api/2.0/mlflow/experiments/search?max_results=1").status_code == 200
    logins = stack.psql(f"SELECT DISTINCT usename FROM pg_stat_activity WHERE datname IN ('{db}', '{db}_auth') "
                        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'").split()
    assert logins == [common.SERVER_ROLE], logins
    assert stack.psql(f"SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles "
                      f"WHERE rolname = '{common.SERVER_ROLE}'") == "f|f|f"
    password = values["POSTGRES_SERVER_PASSWORD"]
    rows = as_role(stack, common.SERVER_ROLE, password, "SELECT count(*) FROM experiments")
    assert rows.returncode == 0 and int(rows.stdout) >= 1, rows.stderr
    refused = {
        "CREATE TABLE stolen (x int)": "permission denied for schema public",
        "DROP TABLE metrics": "must be owner of table metrics",
        "COPY (SELECT 1) TO PROGRAM 'id'": "pg_execute_server_program",
        "SELECT pg_read_file('/etc/passwd')": "permission denied for function pg_read_file",
    }
    for sql, why in refused.items():
        answer = as_role(stack, common.SERVER_ROLE, password, sql)
        assert answer.returncode != 0 and why in answer.stderr, (sql, answer.stderr)
    # The users' database too (the login throttle's tables are there).
    throttle = as_role(stack, common.SERVER_ROLE, password, "SELECT count(*) FROM stack_login_failures", f"{db}_auth")
    assert throttle.returncode == 0, throttle.stderr
    # A wrong password is refused: the role has one of its own.
    assert as_role(stack, common.SERVER_ROLE, password + "x", "SELECT 1").returncode != 0


def test_migrate_run_again_changes_no_role(stack):
    again = stack.compose("run", "--rm", "--no-deps", "migrate", timeout=600)
    output = again.stdout + again.stderr
    assert "the server and gc log in as stack_server" in output, output[-3000:]
    assert "created the role" not in output and "set the password" not in output, output[-3000:]
    assert stack.values()["POSTGRES_SERVER_PASSWORD"] not in output
