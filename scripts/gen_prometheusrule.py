#!/usr/bin/env python3
"""Write deploy/daemonset/prometheusrule.yaml from deploy/daemonset/monitoring/rules.yaml (the one source).

    python scripts/gen_prometheusrule.py [--runbook-base URL] [--check]

The rules file stays a plain Prometheus rules file (promtool tests it); the
Prometheus Operator wants the same groups inside a PrometheusRule. Runbook URLs
in the rules are repository paths (docs/OPERATIONS.md#...); ``--runbook-base``
prefixes them (e.g. the URL of your fork's main branch). ``--check`` exits 1 if the
file on disk differs from what would be written (tests/test_operate.py runs it).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "deploy" / "daemonset" / "monitoring" / "rules.yaml"
TARGET = ROOT / "deploy" / "daemonset" / "prometheusrule.yaml"
HEADER = (
    "# GENERATED from deploy/daemonset/monitoring/rules.yaml by scripts/gen_prometheusrule.py: "
    "edit that file, then run\n"
    "# the script. kube-prometheus-stack picks PrometheusRules by its release label: set it to yours.\n"
)


class _Literal(str):
    """A multi-line PromQL expression, written as a YAML block scalar."""


class _Dumper(yaml.SafeDumper):
    pass


def _literal(dumper: yaml.SafeDumper, data: _Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")


_Dumper.add_representer(_Literal, _literal)


def render(runbook_base: str = "") -> str:
    groups = copy.deepcopy(yaml.safe_load(SOURCE.read_text())["groups"])
    for group in groups:
        for rule in group["rules"]:
            if "\n" in rule["expr"].strip():
                rule["expr"] = _Literal(rule["expr"])
            url = rule.get("annotations", {}).get("runbook_url")
            if url and runbook_base:
                rule["annotations"]["runbook_url"] = runbook_base.rstrip("/") + "/" + url
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "warmstart-agent",
            "labels": {"app.kubernetes.io/name": "warmstart-agent", "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runbook-base", default="", help="URL prefixed to the rules' runbook paths")
    p.add_argument("--check", action="store_true", help="exit 1 if the generated file is not current")
    args = p.parse_args()
    text = render(args.runbook_base)
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run python scripts/gen_prometheusrule.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
