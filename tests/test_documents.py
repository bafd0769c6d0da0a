"""Template documents: decoding, validation listing every problem, the editor JSON Schema."""

from __future__ import annotations

import json

import msgspec
import pytest

from install_service.errors import SchemaItemInvalid, TemplateDocumentInvalid
from install_service.templates import documents
from install_service.templates.schemas import json_schema
from tests.conftest import TEMPLATES, small_doc


def problems_of(data: object) -> list[dict[str, str]]:
    with pytest.raises(TemplateDocumentInvalid) as info:
        documents.parse(data)
    return info.value.problems


class TestBundledTemplates:
    @pytest.mark.parametrize("name", ["personal-finance", "sales-crm", "hiring-pipeline"])
    def test_valid(self, name: str) -> None:
        doc = documents.load_path(TEMPLATES / name)
        assert doc.slug == name
        assert doc.entity_types
        assert doc.relationship_types
        assert doc.watchers
        assert doc.classifiers

    def test_personal_finance_has_the_promised_schema(self) -> None:
        doc = documents.load_path(TEMPLATES / "personal-finance")
        # 17 of its own; `company` is business-core's.
        assert len(doc.entity_types) == 17
        assert len(doc.relationship_types) == 21
        inverse = {r.slug: r.inverse for r in doc.relationship_types}
        assert inverse["employed_by"] == "employee_of"
        assert inverse["employee_of"] == "employed_by"
        employed_by = next(r for r in doc.relationship_types if r.slug == "employed_by")
        assert [(r.source, r.target) for r in employed_by.rules] == [
            ("income_source", "business-core:company")
        ]

    def test_business_core_holds_the_shared_company(self) -> None:
        doc = documents.load_path(TEMPLATES / "business-core")
        assert (doc.requires, [e.slug for e in doc.entity_types]) == ([], ["company"])
        (company,) = doc.entity_types
        assert company.metadata_schema["required"] == ["legal_name"]
        # What sales-crm and personal-finance each said of a company, in one type.
        properties = company.metadata_schema["properties"]
        assert {"account_type", "arr", "domain", "health"} <= set(properties)
        assert {"company_number", "company_type", "utr", "vat_number"} <= set(properties)
        for name in ("personal-finance", "sales-crm", "hiring-pipeline"):
            dependent = documents.load_path(TEMPLATES / name)
            assert [r.template for r in dependent.requires] == ["business-core"]
            assert "company" not in {e.slug for e in dependent.entity_types}

    def test_json_schema_file_matches_the_structs(self) -> None:
        on_disk = json.loads((TEMPLATES / "template.schema.json").read_text())
        assert on_disk == json_schema()


class TestFormats:
    def test_yaml_toml_and_json_give_the_same_document(self) -> None:
        as_toml = b"""
slug = "tiny"
name = "Tiny"
[[entity_types]]
slug = "person"
name = "Person"
metadata_schema = { type = "object" }
[[relationship_types]]
slug = "knows"
name = "Knows"
is_symmetric = true
rules = [{ source = "person", target = "person" }]
"""
        data = documents.decode(as_toml, "toml")
        parsed = [
            documents.parse(documents.decode(msgspec.json.encode(data), "json")),
            documents.parse(documents.decode(msgspec.yaml.encode(data), "yaml")),
            documents.parse(data),
        ]
        assert parsed[0] == parsed[1] == parsed[2]
        assert parsed[0].relationship_types[0].rules[0].target == "person"

    def test_syntax_error_is_reported_not_raised_raw(self) -> None:
        with pytest.raises(TemplateDocumentInvalid) as info:
            documents.decode(b"slug: [unclosed", "yaml")
        assert "not valid YAML" in info.value.problems[0]["message"]


class TestValidation:
    def test_every_problem_is_listed_at_once(self) -> None:
        doc = small_doc()
        doc["entity_types"].append({"slug": "person", "name": "Duplicate"})
        doc["entity_types"].append({"slug": "$member", "name": "System"})
        doc["relationship_types"][0]["rules"].append({"source": "person", "target": "ghost"})
        doc["relationship_types"][1]["inverse"] = "knows"
        doc["classifiers"][0]["watcher"] = "nowhere"
        doc["classifiers"][0]["fallback_value"] = "unknown"
        doc["watchers"].append({"slug": "Bad Slug", "name": "x", "prompt": "p"})
        doc["watchers"].append({"slug": "w2", "name": "x", "prompt": "p", "colour": "red"})

        found = {(p["path"], p["message"].split(" ")[0]) for p in problems_of(doc)}

        paths = {path for path, _ in found}
        assert "$.entity_types[0].slug" in paths  # duplicate, both places
        assert "$.entity_types[2].slug" in paths
        assert "$.entity_types[3].slug" in paths  # reserved $ slug
        assert "$.relationship_types[0].rules[1].target" in paths  # dangling
        assert "$.relationship_types[0].inverse" in paths  # no longer points back
        assert "$.relationship_types[1].inverse" in paths  # symmetric/not pointing back
        assert "$.classifiers[0].watcher" in paths
        assert "$.classifiers[0].fallback_value" in paths
        assert "$.watchers[1]" in paths  # malformed slug
        assert "$.watchers[2]" in paths  # unknown field
        assert len(paths) >= 10

    def test_inverse_must_point_back(self) -> None:
        doc = small_doc()
        doc["relationship_types"][1]["inverse"] = None
        problems = problems_of(doc)
        assert problems == [
            {
                "path": "$.relationship_types[0].inverse",
                "message": "inverse 'employs' does not point back: its inverse is None, "
                "expected 'employed_by'",
            }
        ]

    def test_symmetric_type_cannot_have_an_inverse(self) -> None:
        doc = small_doc()
        doc["relationship_types"][2]["inverse"] = "knows"
        assert problems_of(doc)[0]["message"].startswith("a type cannot be its own inverse")

    def test_control_characters_and_nul_are_rejected(self) -> None:
        doc = small_doc(name="Bad\x00name")
        doc["watchers"][0]["prompt"] = "ok\nfine\tbut \x07 bell"
        paths = {p["path"] for p in problems_of(doc)}
        assert {"$.name", "$.watchers[0].prompt"} <= paths

    def test_lone_surrogate_is_rejected(self) -> None:
        doc = small_doc(description="broken \ud800 text")
        assert any(p["path"] == "$.description" for p in problems_of(doc))

    def test_huge_schema_is_rejected(self) -> None:
        doc = small_doc()
        doc["entity_types"][0]["metadata_schema"] = {"description": "x" * 300_000}
        problems = problems_of(doc)
        assert problems[0]["path"] == "$.entity_types[0].metadata_schema"

    def test_odd_unicode_in_names_is_kept(self) -> None:
        doc = documents.parse(small_doc(name="Ünïcödé ✓ 名前 🚀"))
        assert doc.name == "Ünïcödé ✓ 名前 🚀"

    def test_not_a_mapping(self) -> None:
        assert problems_of([1, 2])[0]["message"] == "expected a mapping"

    def test_snapshot_is_canonical(self) -> None:
        doc = small_doc()
        reordered = small_doc()
        reordered["entity_types"].reverse()
        reordered["relationship_types"][0]["rules"].reverse()
        assert documents.snapshot(documents.parse(doc)) == documents.snapshot(
            documents.parse(reordered)
        )


class TestOneItem:
    """An item validated on its own, as an organization writes one: the same rules as a
    document's item, its references resolved in what the organization has."""

    KNOWN = documents.Known(
        entity_types={"person", "company"},
        watchers={"inbox"},
        relationship_types={"knows": (None, True), "employs": (None, False)},
    )

    def problems_of(self, kind: str, data: object) -> list[dict[str, str]]:
        with pytest.raises(SchemaItemInvalid) as info:
            documents.parse_item(kind, data, self.KNOWN)
        return info.value.problems

    def test_the_documents_rules_at_the_items_paths(self) -> None:
        problems = self.problems_of(
            "classifiers",
            {
                "slug": "mood",
                "name": "Mood",
                "attribute_key": "mood",
                "entity_type": "pet",
                "watcher": "outbox",
                "attribute_values": {"calm": "Calm"},
                "fallback_value": "angry",
                "policies": {"name": "tenant"},
            },
        )
        assert [p["path"] for p in problems] == [
            "$.policies",
            "$.entity_type",
            "$.watcher",
            "$.fallback_value",
        ]
        assert (
            self.problems_of(
                "watchers", {"slug": "w", "name": "W", "prompt": "p", "schedule": "x"}
            )[0]["path"]
            == "$.schedule"
        )
        assert self.problems_of("entity_types", {"slug": "$x", "name": "X"})[0]["path"] == "$.slug"
        assert (
            self.problems_of("entity_types", {"slug": "x", "name": "bad\x07"})[0]["path"]
            == "$.name"
        )
        assert self.problems_of("entity_types", [1])[0]["message"] == "expected a mapping"

    def test_an_inverse_pairs_with_a_free_one_only(self) -> None:
        rel = {"slug": "employed_by", "name": "Employed by", "inverse": "employs"}
        parsed = documents.parse_item("relationship_types", rel, self.KNOWN)
        assert parsed.inverse == "employs"
        symmetric = self.problems_of("relationship_types", rel | {"inverse": "knows"})
        assert symmetric[0]["message"].startswith("inverse 'knows' is symmetric")
        taken = documents.Known(
            entity_types=set(), watchers=set(), relationship_types={"employs": ("other", False)}
        )
        with pytest.raises(SchemaItemInvalid) as info:
            documents.parse_item("relationship_types", rel, taken)
        assert "does not point back: its inverse is 'other'" in info.value.problems[0]["message"]
        itself = self.problems_of("relationship_types", rel | {"inverse": "employed_by"})
        assert itself[0]["message"].startswith("a type cannot be its own inverse")

    def test_content_is_the_release_items_shape(self) -> None:
        parsed = documents.parse_item(
            "relationship_types",
            {
                "slug": "links",
                "name": "Links",
                "rules": [
                    {"source": "person", "target": "person"},
                    {"source": "company", "target": "person"},
                ],
            },
            self.KNOWN,
        )
        snap = documents.snapshot(documents.parse(small_doc()))
        assert set(documents.item_content(parsed)) == set(snap["relationship_types"][0])
        assert documents.item_content(parsed)["rules"] == [
            {"source": "company", "target": "person"},
            {"source": "person", "target": "person"},
        ]
