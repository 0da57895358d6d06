"""JUnit XML from real pipeline reports: structure, counts, failures, skipped sites, schema."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import torch
from torch import nn

from normc import api
from normc.frontend.specs import InputSpec, LoadedModel
from normc.report.junit import junit_tree, write_junit
from tests.fixtures.wrong_rules import fold_without_beta

# A compact JUnit schema with the structure of the common "Apache Ant JUnit" XSD (as Jenkins,
# GitLab and GitHub reporters read it): testsuites > testsuite > properties?, testcase*;
# testcase > (skipped | error | failure)?, system-out?, system-err?.
JUNIT_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="qualified">
  <xs:simpleType name="ISO8601_DATETIME_PATTERN">
    <xs:restriction base="xs:dateTime">
      <xs:pattern value="[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"/>
    </xs:restriction>
  </xs:simpleType>
  <xs:complexType name="problem">
    <xs:simpleContent>
      <xs:extension base="xs:string">
        <xs:attribute name="message" type="xs:string"/>
        <xs:attribute name="type" type="xs:string"/>
      </xs:extension>
    </xs:simpleContent>
  </xs:complexType>
  <xs:complexType name="counts">
    <xs:attribute name="name" type="xs:string" use="required"/>
    <xs:attribute name="tests" type="xs:nonNegativeInteger" use="required"/>
    <xs:attribute name="failures" type="xs:nonNegativeInteger" use="required"/>
    <xs:attribute name="errors" type="xs:nonNegativeInteger" use="required"/>
    <xs:attribute name="skipped" type="xs:nonNegativeInteger"/>
    <xs:attribute name="time" type="xs:decimal" use="required"/>
  </xs:complexType>
  <xs:element name="testsuites">
    <xs:complexType>
      <xs:complexContent>
        <xs:extension base="counts">
          <xs:sequence>
            <xs:element ref="testsuite" minOccurs="0" maxOccurs="unbounded"/>
          </xs:sequence>
        </xs:extension>
      </xs:complexContent>
    </xs:complexType>
  </xs:element>
  <xs:element name="testsuite">
    <xs:complexType>
      <xs:complexContent>
        <xs:extension base="counts">
          <xs:sequence>
            <xs:element name="properties" minOccurs="0">
              <xs:complexType>
                <xs:sequence>
                  <xs:element name="property" minOccurs="0" maxOccurs="unbounded">
                    <xs:complexType>
                      <xs:attribute name="name" type="xs:string" use="required"/>
                      <xs:attribute name="value" type="xs:string" use="required"/>
                    </xs:complexType>
                  </xs:element>
                </xs:sequence>
              </xs:complexType>
            </xs:element>
            <xs:element name="testcase" minOccurs="0" maxOccurs="unbounded">
              <xs:complexType>
                <xs:sequence>
                  <xs:choice minOccurs="0">
                    <xs:element name="skipped" type="problem"/>
                    <xs:element name="error" type="problem"/>
                    <xs:element name="failure" type="problem"/>
                  </xs:choice>
                  <xs:element name="system-out" type="xs:string" minOccurs="0"/>
                  <xs:element name="system-err" type="xs:string" minOccurs="0"/>
                </xs:sequence>
                <xs:attribute name="name" type="xs:string" use="required"/>
                <xs:attribute name="classname" type="xs:string" use="required"/>
                <xs:attribute name="time" type="xs:decimal" use="required"/>
              </xs:complexType>
            </xs:element>
            <xs:element name="system-out" type="xs:string" minOccurs="0"/>
            <xs:element name="system-err" type="xs:string" minOccurs="0"/>
          </xs:sequence>
          <xs:attribute name="timestamp" type="ISO8601_DATETIME_PATTERN"/>
          <xs:attribute name="hostname" type="xs:string"/>
        </xs:extension>
      </xs:complexContent>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""

GOOD = "pipeline {\n  apply std.bn\n  verify rel 1e-5\n}\n"

# BN folding that forgets beta: matches, applies, and breaks the function.
WRONG = fold_without_beta() + """
pipeline {
  apply fold_wrong
  verify rel 1e-5
}
"""


class TwoHeads(nn.Module):
    """conv+BN (foldable), conv+BN whose conv output is reused (skipped: not single use),
    linear+BN1d; two named outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.fc_bn = nn.BatchNorm1d(6)
        for bn in (self.bn, self.bn2, self.fc_bn):
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        c = self.conv2(h)
        h = self.bn2(c) + c  # conv2's output has two users
        feat = h.mean(dim=(2, 3))
        return {"logits": self.fc_bn(self.fc(feat)), "feat": feat}


def _loaded():
    torch.manual_seed(0)
    m = TwoHeads().eval()
    x = torch.randn(2, 3, 8, 8)
    return LoadedModel(m, (x,), {}, [InputSpec.from_example("x", x)], "TwoHeads", False)


@pytest.fixture(scope="module")
def good_report():
    result = api.check(api.load_rules(text=GOOD), _loaded(), verify_inputs=1)
    assert result.passed
    return result.report


@pytest.fixture(scope="module")
def dry_report():
    return api.check(api.load_rules(text=GOOD), _loaded(), dry_run=True).report


@pytest.fixture(scope="module")
def schema():
    xmlschema = pytest.importorskip("xmlschema")
    return xmlschema.XMLSchema(JUNIT_XSD)


@pytest.fixture(scope="module")
def bad_report():
    result = api.check(api.load_rules(text=WRONG), _loaded(), verify_inputs=1)
    assert not result.passed
    return result.report


def _write(report, tmp_path, name="results.xml"):
    path = tmp_path / "ci" / name
    write_junit(report, path)
    return path, ET.parse(path).getroot()


def _cases(root):
    return list(root.iter("testcase"))


def test_structure_and_counts_for_a_passing_run(good_report, tmp_path):
    path, root = _write(good_report, tmp_path)
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = _cases(root)
    # 3 rules (std.fold_bn_conv, std.fold_bn_conv_transpose, std.fold_bn_linear) x 2 outputs + 1 verify step + pipeline
    assert len(cases) == 8
    for el in (root, suite):
        assert el.get("tests") == "8"
        assert el.get("failures") == "0"
        assert el.get("errors") == "0"
        assert el.get("skipped") == "0"
    rule_cases = [(c.get("classname"), c.get("name")) for c in cases[:6]]
    assert sorted(rule_cases) == sorted(
        (r, o) for r in ("std.fold_bn_conv", "std.fold_bn_conv_transpose", "std.fold_bn_linear")
        for o in ("logits", "feat"))
    assert cases[6].get("classname") == "normc.steps" and cases[6].get("name").startswith("verify #1")
    assert (cases[7].get("classname"), cases[7].get("name")) == ("normc", "pipeline")
    assert not any(c.find("failure") is not None for c in cases)
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["model"] == "TwoHeads"
    assert not [p for p in path.parent.iterdir() if p.name != "results.xml"]  # no temp files left


def test_skipped_sites_are_listed_in_system_out(good_report, tmp_path):
    _, root = _write(good_report, tmp_path)
    conv_cases = [c for c in _cases(root) if c.get("classname") == "std.fold_bn_conv"]
    assert len(conv_cases) == 2
    for c in conv_cases:
        out = c.findtext("system-out")
        assert "skipped 1 site(s)" in out
        assert "bn2 (batch_norm_1): conv `conv2` output has 2 users: " in out  # the site and its reason
    linear_cases = [c for c in _cases(root) if c.get("classname") == "std.fold_bn_linear"]
    assert linear_cases and all("skipped" not in (c.findtext("system-out") or "") for c in linear_cases)


def test_failing_rule_fails_its_output_cases(bad_report, tmp_path):
    _, root = _write(bad_report, tmp_path)
    cases = _cases(root)
    by = {(c.get("classname"), c.get("name")): c for c in cases}
    # the pipeline stops at the failing apply step: the verify step after it never runs
    assert set(by) == {("fold_wrong", "logits"), ("fold_wrong", "feat"), ("normc", "pipeline")}
    failed = [k for k, c in by.items() if c.find("failure") is not None]
    assert root.get("tests") == "3"
    assert root.get("failures") == str(len(failed)) == root.find("testsuite").get("failures")
    assert ("normc", "pipeline") in failed
    f = by[("fold_wrong", "logits")].find("failure")
    assert f is not None
    assert "after `apply fold_wrong`" in f.get("message")
    assert "max_rel" in f.text and "FAILED" in f.text


def test_whole_pipeline_failure_fails_every_rule_case(good_report, tmp_path):
    report = {**good_report, "verify": {**good_report["verify"], "passed": False,
                                        "failure": "approximate rewrite error 0.2 exceeds the gate"}}
    _, root = _write(report, tmp_path)
    rule_cases = [c for c in _cases(root) if c.get("classname", "").startswith("std.")]
    assert rule_cases and all(c.find("failure") is not None for c in rule_cases)
    assert all("exceeds the gate" in c.find("failure").get("message") for c in rule_cases)
    assert root.get("failures") == str(len(rule_cases) + 1)  # + pipeline; the verify step itself passed


def test_dry_run_report_gives_skipped_cases(dry_report, tmp_path):
    _, root = _write(dry_report, tmp_path)
    skipped = [c for c in _cases(root) if c.find("skipped") is not None]
    assert len(skipped) == 4  # 3 rules + the verify step
    assert root.get("skipped") == "4"


def test_awkward_text_is_escaped(good_report, tmp_path):
    report = {**good_report, "rules": [dict(good_report["rules"][0], name="r<&>\"'",
                                            skipped=[{"site": "a\x00b", "key": "k", "reason": "<bad> & \x1b[31m"}])]}
    _, root = _write(report, tmp_path)
    case = next(c for c in _cases(root) if c.get("classname") == "r<&>\"'")
    assert "<bad> &" in case.findtext("system-out")


def test_xml_text_round_trips_with_tree(good_report):
    tree = junit_tree(good_report, suite_name="my-suite")
    root = tree.getroot()
    assert root.get("name") == "my-suite" and root.find("testsuite").get("name") == "my-suite"
    assert any(c.get("classname") == "my-suite.steps" for c in root.iter("testcase"))


def test_pytest_style_reader_finds_the_cases(bad_report, tmp_path):
    """Parse the way pytest's own junitxml tests read reports: the first testsuite, its cases,
    and a failure child per failing case; totals agree with the children."""
    path, _ = _write(bad_report, tmp_path)
    dom = ET.parse(str(path))
    suite = dom.getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases)
    assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
    assert int(suite.get("skipped")) == sum(c.find("skipped") is not None for c in cases)
    assert all(float(c.get("time")) >= 0 for c in cases)


@pytest.mark.parametrize("which", ["good", "bad", "dry"])
def test_validates_against_junit_xsd(which, schema, good_report, bad_report, dry_report, tmp_path):
    report = {"good": good_report, "bad": bad_report, "dry": dry_report}[which]
    path, _ = _write(report, tmp_path)
    schema.validate(str(path))  # raises with the offending path on error


def test_schema_rejects_a_broken_file(schema, tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text('<testsuites name="x" tests="1" failures="0" errors="0" time="0">'
                   '<testsuite name="x" tests="1" failures="0" errors="0" time="0"><testcase name="a"/>'
                   "</testsuite></testsuites>")
    assert not schema.is_valid(str(bad))  # the schema is strict enough to mean something


def test_failed_write_leaves_previous_file(tmp_path):
    path = tmp_path / "results.xml"
    path.write_text("previous")
    with pytest.raises(TypeError):
        write_junit({"rules": 5}, path)
    assert path.read_text() == "previous"


def test_a_rule_applied_twice_gets_distinct_cases(tmp_path):
    text = "pipeline {\n  apply std.fold_bn_conv\n  verify rel 1e-5\n  apply std.fold_bn_conv\n}\n"
    report = api.check(api.load_rules(text=text), _loaded(), verify_inputs=1).report
    _, root = _write(report, tmp_path)
    keys = [(c.get("classname"), c.get("name")) for c in _cases(root)]
    assert len(keys) == len(set(keys))
    assert ("std.fold_bn_conv", "logits") in keys and ("std.fold_bn_conv #2", "logits") in keys
    second = next(c for c in _cases(root) if c.get("classname") == "std.fold_bn_conv #2")
    assert second.find("failure") is None and second.find("skipped") is None  # verified by the final check
