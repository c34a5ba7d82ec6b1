"""Checks deploy/ against what RTAP serves (used by deploy-check.sh).

Usage: deploy_check.py DEPLOY_DIR SCRAPE [SCRAPE ...]

- Every `rtap_*` metric named in the alert rules and in the Grafana
  dashboards is served by one of the scraped /metrics outputs (a histogram's
  `_bucket`, `_sum` and `_count` count as its name).
- Every dashboard has the structure Grafana provisions: a uid, a title,
  panels with unique ids, a grid position, a Prometheus data source and at
  least one query each.
Exits non-zero naming every problem found.
"""

import json
import pathlib
import re
import sys

METRIC = re.compile(r"\b(rtap_[a-z0-9_]+)")
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def served(paths):
    names = set()
    for path in paths:
        for line in pathlib.Path(path).read_text().splitlines():
            if line.startswith("# TYPE "):
                names.add(line.split()[2])
            elif line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def base(name):
    for part in HISTOGRAM_PARTS:
        if name.endswith(part):
            return name[: -len(part)]
    return name


def dashboard_problems(path):
    problems = []
    try:
        dashboard = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        return [f"{path}: not JSON: {error}"], []
    for field in ("uid", "title", "panels", "schemaVersion"):
        if field not in dashboard:
            problems.append(f"{path}: no `{field}`")
    ids = set()
    expressions = []
    for panel in dashboard.get("panels", []):
        where = f"{path}: panel {panel.get('title', '?')!r}"
        if panel.get("id") in ids:
            problems.append(f"{where}: id {panel.get('id')} used twice")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")):
            problems.append(f"{where}: no gridPos x, y, w, h")
        if panel.get("datasource", {}).get("type") != "prometheus":
            problems.append(f"{where}: its data source is not Prometheus")
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"{where}: no query")
        for target in targets:
            if not target.get("expr"):
                problems.append(f"{where}: a query without `expr`")
            expressions.append((where, target.get("expr", "")))
    return problems, expressions


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    deploy = pathlib.Path(argv[1])
    names = served(argv[2:])
    problems = []
    expressions = []
    for rules in sorted((deploy / "prometheus").glob("alerts*.yml")):
        if rules.name.endswith("-test.yml"):
            continue
        expressions.append((str(rules), rules.read_text()))
    dashboards = sorted((deploy / "grafana" / "dashboards").glob("*.json"))
    if not dashboards:
        problems.append(f"{deploy}/grafana/dashboards: no dashboard")
    for path in dashboards:
        found, queries = dashboard_problems(path)
        problems += found
        expressions += queries
    referenced = 0
    for where, text in expressions:
        for name in METRIC.findall(text):
            referenced += 1
            if base(name) not in names and name not in names:
                problems.append(f"{where}: `{name}` is not served")
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{referenced} metric references checked against {len(names)} served names")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
