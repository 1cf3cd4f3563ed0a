"""Real-world response formats and tool lists, as test data: what the grammar bounds must let through.

Written after the shapes people send: OpenAI's structured-output examples, OpenAPI-derived function
tools (GitHub-, Stripe- and calendar-like operations), nested objects with enums, arrays of objects,
recursive trees, and the string patterns of common formats (semver, hostnames, e-mail, phone numbers,
ISO codes). tests/unit/test_grammar_cost.py runs every one through the edge's checks.
"""

from __future__ import annotations

from typing import Any

COUNTRIES = [f"{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(249)]
TIME_ZONES = [f"Region{i // 40}/City_Name_{i}" for i in range(420)]
CURRENCIES = [f"C{i:02d}" for i in range(180)]

ADDRESS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "maxLength": 120},
        "city": {"type": "string"},
        "postal_code": {"type": "string", "pattern": "^[0-9A-Z -]{3,10}$"},
        "country": {"type": "string", "enum": COUNTRIES},
    },
    "required": ["street", "city", "country"],
    "additionalProperties": False,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "math_reasoning": {
        "type": "object",
        "properties": {
            "steps": {"type": "array", "items": {
                "type": "object", "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
                "required": ["explanation", "output"], "additionalProperties": False}},
            "final_answer": {"type": "string"},
        },
        "required": ["steps", "final_answer"], "additionalProperties": False,
    },
    "calendar_event": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "date": {"type": "string", "format": "date"},
                       "participants": {"type": "array", "items": {"type": "string"}, "maxItems": 50}},
        "required": ["name", "date", "participants"], "additionalProperties": False,
    },
    "research_paper": {
        "type": "object",
        "properties": {
            "title": {"type": "string"}, "authors": {"type": "array", "items": {"type": "string"}},
            "abstract": {"type": "string"}, "keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        },
        "required": ["title", "authors", "abstract", "keywords"],
    },
    "moderation": {
        "type": "object",
        "properties": {
            "is_violating": {"type": "boolean"},
            "category": {"type": ["string", "null"], "enum": ["violence", "sexual", "self_harm", "hate", None]},
            "explanation": {"type": ["string", "null"]},
        },
        "required": ["is_violating", "category", "explanation"],
    },
    "ui_tree": {  # OpenAI's recursive UI example
        "$defs": {"ui": {
            "type": "object",
            "properties": {
                "type": {"type": "string", "enum": ["div", "button", "header", "section", "field", "form"]},
                "label": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/ui"}},
                "attributes": {"type": "array", "items": {
                    "type": "object", "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
                    "required": ["name", "value"]}},
            },
            "required": ["type", "label", "children", "attributes"],
        }},
        "$ref": "#/$defs/ui",
    },
    "linked_list": {
        "$defs": {"node": {"type": "object", "properties": {
            "value": {"type": "number"},
            "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["value", "next"]}},
        "type": "object", "properties": {"head": {"$ref": "#/$defs/node"}}, "required": ["head"],
    },
    "file_tree_root_ref": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "is_dir": {"type": "boolean"},
                       "children": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["name", "is_dir"],
    },
    "invoice": {
        "type": "object",
        "properties": {
            "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{4,8}$"},
            "issued": {"type": "string", "format": "date"},
            "currency": {"type": "string", "enum": CURRENCIES},
            "seller": ADDRESS, "buyer": ADDRESS,
            "lines": {"type": "array", "minItems": 1, "maxItems": 100, "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3,6}$"},
                               "description": {"type": "string", "maxLength": 200},
                               "quantity": {"type": "integer", "minimum": 1},
                               "unit_price": {"type": "number"},
                               "tax": {"type": "string", "enum": ["standard", "reduced", "zero", "exempt"]}},
                "required": ["sku", "quantity", "unit_price"]}},
            "total": {"type": "number"},
        },
        "required": ["invoice_number", "issued", "currency", "lines", "total"],
    },
    "person_profile": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "email": {"type": "string", "pattern": "^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+[.][a-zA-Z]{2,}$"},
            "phone": {"type": "string",
                      "pattern": "^[+]?[0-9]{1,3}?[-. ]?[(]?[0-9]{3}[)]?[-. ]?[0-9]{3}[-. ]?[0-9]{4}$"},
            "time_zone": {"type": "string", "enum": TIME_ZONES},
            "address": ADDRESS,
            "languages": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2}(-[A-Z]{2})?$"}},
            "born": {"type": "string", "format": "date"},
        },
        "required": ["id", "email"],
    },
    "package_manifest": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^(@[a-z0-9-~][a-z0-9-._~]*/)?[a-z0-9-~][a-z0-9-._~]*$"},
            "version": {"type": "string", "pattern": "^(0|[1-9][0-9]*)[.](0|[1-9][0-9]*)[.](0|[1-9][0-9]*)"
                                                    "(-[0-9A-Za-z-]+([.][0-9A-Za-z-]+)*)?([+][0-9A-Za-z-]+"
                                                    "([.][0-9A-Za-z-]+)*)?$"},
            "license": {"type": "string", "enum": ["MIT", "Apache-2.0", "BSD-3-Clause", "GPL-3.0", "ISC"]},
            "dependencies": {"type": "object", "additionalProperties": {"type": "string"}},
            "keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
        },
        "required": ["name", "version"],
    },
    "server_config": {
        "type": "object",
        "properties": {
            "hostname": {"type": "string", "pattern": "^([a-z0-9]+(-[a-z0-9]+)*[.])+[a-z]{2,}$"},
            "ipv4": {"type": "string", "pattern": "^(([0-9]{1,3})[.]){3}[0-9]{1,3}$"},
            "mac": {"type": "string", "pattern": "^([0-9a-f]{2}:){5}[0-9a-f]{2}$"},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "tls": {"type": "object", "properties": {"enabled": {"type": "boolean"},
                                                      "min_version": {"type": "string", "enum": ["1.2", "1.3"]}}},
            "log_level": {"type": "string", "enum": ["debug", "info", "warning", "error"]},
            "started": {"type": "string", "format": "date-time"},
            "color": {"type": "string", "pattern": "^#[0-9a-fA-F]{6}$"},
        },
        "required": ["hostname", "port"],
    },
    "classification": {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": [f"category_{i}" for i in range(120)]},
                       "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                       "alternatives": {"type": "array", "maxItems": 3, "items": {
                           "type": "object", "properties": {"label": {"type": "string"},
                                                            "confidence": {"type": "number"}}}}},
        "required": ["label", "confidence"],
    },
    "entities": {
        "type": "object",
        "properties": {"entities": {"type": "array", "items": {
            "type": "object",
            "properties": {"text": {"type": "string"},
                           "type": {"type": "string", "enum": ["PERSON", "ORG", "LOC", "DATE", "MONEY", "PRODUCT"]},
                           "start": {"type": "integer"}, "end": {"type": "integer"}},
            "required": ["text", "type", "start", "end"]}}},
        "required": ["entities"],
    },
    "discriminated_shapes": {
        "type": "object",
        "properties": {"shapes": {"type": "array", "items": {"oneOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
             "required": ["kind", "r"]},
            {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "number"},
                                              "h": {"type": "number"}}, "required": ["kind", "w", "h"]},
            {"type": "object", "properties": {"kind": {"const": "polygon"}, "points": {"type": "array", "items": {
                "type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}]}}},
             "required": ["kind", "points"]},
        ]}}},
    },
    "sql_query": {
        "type": "object",
        "properties": {
            "table": {"type": "string", "pattern": "^[a-z_][a-z0-9_]{0,62}$"},
            "columns": {"type": "array", "items": {"type": "string", "pattern": "^[a-z_][a-z0-9_]*$"}},
            "conditions": {"type": "array", "items": {
                "type": "object",
                "properties": {"column": {"type": "string"},
                               "operator": {"type": "string", "enum": ["=", ">", "<", ">=", "<=", "!=", "LIKE", "IN"]},
                               "value": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}},
                "required": ["column", "operator", "value"]}},
            "order_by": {"type": "array", "items": {"type": "object", "properties": {
                "column": {"type": "string"}, "direction": {"type": "string", "enum": ["asc", "desc"]}}}},
            "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
        },
        "required": ["table", "columns"],
    },
    "recipe": {
        "type": "object",
        "properties": {
            "title": {"type": "string"}, "servings": {"type": "integer"},
            "ingredients": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "amount": {"type": "number"},
                "unit": {"type": "string", "enum": ["g", "kg", "ml", "l", "tsp", "tbsp", "cup", "piece"]}},
                "required": ["name", "amount"]}},
            "steps": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "diet": {"type": "array", "items": {"type": "string", "enum": ["vegan", "vegetarian", "gluten_free",
                                                                          "dairy_free", "nut_free"]}},
        },
        "required": ["title", "ingredients", "steps"],
    },
    "review_sentiment": {
        "type": "object",
        "properties": {"sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
                       "aspects": {"type": "object", "additionalProperties": {
                           "type": "string", "enum": ["positive", "neutral", "negative"]}},
                       "summary": {"type": "string", "maxLength": 280}},
        "required": ["sentiment"],
    },
    "org_chart": {
        "$defs": {"employee": {"type": "object", "properties": {
            "name": {"type": "string"}, "title": {"type": "string"},
            "reports": {"type": "array", "items": {"$ref": "#/$defs/employee"}}}, "required": ["name"]}},
        "type": "object", "properties": {"ceo": {"$ref": "#/$defs/employee"}}, "required": ["ceo"],
    },
    "json_expression": {  # an expression tree: operators over numbers or sub-expressions
        "$defs": {"expr": {"anyOf": [
            {"type": "number"},
            {"type": "object", "properties": {"op": {"type": "string", "enum": ["+", "-", "*", "/"]},
                                              "args": {"type": "array", "items": {"$ref": "#/$defs/expr"},
                                                       "minItems": 2, "maxItems": 2}},
             "required": ["op", "args"]}]}},
        "type": "object", "properties": {"expression": {"$ref": "#/$defs/expr"}}, "required": ["expression"],
    },
    "geo_feature": {
        "type": "object",
        "properties": {
            "type": {"const": "Feature"},
            "geometry": {"type": "object", "properties": {
                "type": {"type": "string", "enum": ["Point", "LineString", "Polygon"]},
                "coordinates": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 3}},
                "required": ["type", "coordinates"]},
            "properties": {"type": "object", "additionalProperties": True},
        },
        "required": ["type", "geometry"],
    },
    "flight_booking": {
        "type": "object",
        "properties": {
            "from": {"type": "string", "pattern": "^[A-Z]{3}$"}, "to": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "depart": {"type": "string", "format": "date-time"},
            "passengers": {"type": "array", "minItems": 1, "maxItems": 9, "items": {
                "type": "object", "properties": {
                    "first_name": {"type": "string", "pattern": "^[A-Za-z]+( [A-Za-z]+)*$"},
                    "last_name": {"type": "string", "minLength": 1, "maxLength": 64},
                    "seat": {"type": "string", "pattern": "^[0-9]{1,2}[A-K]$"},
                    "class": {"type": "string", "enum": ["economy", "premium", "business", "first"]}},
                "required": ["first_name", "last_name"]}},
        },
        "required": ["from", "to", "depart", "passengers"],
    },
    "table_extraction": {
        "type": "object",
        "properties": {"headers": {"type": "array", "items": {"type": "string"}, "maxItems": 30},
                       "rows": {"type": "array", "items": {"type": "array", "items": {
                           "anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]}}}},
        "required": ["headers", "rows"],
    },
    "wide_form": {
        "type": "object",
        "properties": {f"field_{i}": {"type": ["string", "null"], "maxLength": 100} for i in range(100)},
    },
    "translation": {
        "type": "object",
        "properties": {"source_language": {"type": "string", "pattern": "^[a-z]{2,3}(-[A-Z][a-z]{3})?(-[A-Z]{2})?$"},
                       "target_language": {"type": "string", "pattern": "^[a-z]{2,3}$"},
                       "text": {"type": "string"}},
        "required": ["source_language", "target_language", "text"],
    },
    "chain_of_thought_steps": {
        "type": "array", "minItems": 1, "maxItems": 20,
        "items": {"type": "object", "properties": {"thought": {"type": "string"}, "action": {
            "type": "string", "enum": ["search", "lookup", "calculate", "finish"]},
            "input": {"type": "string"}}, "required": ["thought", "action"]},
    },
    "slug_and_tags": {
        "type": "object",
        "properties": {"slug": {"type": "string", "pattern": "^[a-z0-9]+(-[a-z0-9]+)*$"},
                       "tags": {"type": "array", "items": {"type": "string", "pattern": "^#?[a-z][a-z0-9_]{1,29}$"},
                                "maxItems": 10}},
        "required": ["slug"],
    },
    "country_stats": {
        "type": "object",
        "properties": {"country": {"type": "string", "enum": COUNTRIES},
                       "population": {"type": "integer"}, "gdp_usd": {"type": "number"},
                       "capital": {"type": "string"}, "neighbours": {"type": "array", "items": {
                           "type": "string", "enum": COUNTRIES}}},
        "required": ["country", "population"],
    },
    "json_object": {"type": "object"},
    "short_answer": {"type": "string", "maxLength": 256},
    "yes_no": {"type": "string", "enum": ["yes", "no"]},
    "score_list": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}, "maxItems": 256},
}


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required}}


_REPO = {"owner": {"type": "string"}, "repo": {"type": "string"}}
_PAGE = {"per_page": {"type": "integer", "minimum": 1, "maximum": 100}, "page": {"type": "integer", "minimum": 1}}

TOOL_LISTS: dict[str, list[dict[str, Any]]] = {
    "weather": [
        _tool("get_weather", "Current weather", {"city": {"type": "string"},
                                                 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
              ["city"]),
        _tool("get_forecast", "Forecast", {"city": {"type": "string"},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 14}}, ["city"]),
    ],
    "github_like": [  # OpenAPI operations turned into functions, as SDKs generate them
        _tool("issues_list", "List issues", {**_REPO, "state": {"type": "string", "enum": ["open", "closed", "all"]},
                                             "labels": {"type": "string"}, "sort": {"type": "string", "enum": [
                                                 "created", "updated", "comments"]},
                                             "direction": {"type": "string", "enum": ["asc", "desc"]}, **_PAGE},
              ["owner", "repo"]),
        _tool("issues_create", "Create an issue", {**_REPO, "title": {"type": "string"}, "body": {"type": "string"},
                                                   "assignees": {"type": "array", "items": {"type": "string"}},
                                                   "labels": {"type": "array", "items": {"type": "string"}}},
              ["owner", "repo", "title"]),
        _tool("pulls_create", "Open a pull request", {**_REPO, "title": {"type": "string"}, "head": {"type": "string"},
                                                      "base": {"type": "string"}, "draft": {"type": "boolean"}},
              ["owner", "repo", "head", "base"]),
        _tool("repos_get_content", "Read a file", {**_REPO, "path": {"type": "string"}, "ref": {"type": "string"}},
              ["owner", "repo", "path"]),
        _tool("search_code", "Search code", {"q": {"type": "string"}, **_PAGE}, ["q"]),
    ] + [_tool(f"operation_{i}", f"Generated operation {i}",
               {**_REPO, "id": {"type": "integer"}, "filter": {"type": "string", "enum": ["a", "b", "c"]}, **_PAGE},
               ["owner", "repo", "id"]) for i in range(40)],
    "payments_like": [
        _tool("create_charge", "Charge a card", {
            "amount": {"type": "integer", "minimum": 50}, "currency": {"type": "string", "enum": CURRENCIES},
            "customer": {"type": "string", "pattern": "^cus_[A-Za-z0-9]{14,24}$"},
            "metadata": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 500}},
            "shipping": {"type": "object", "properties": {"name": {"type": "string"}, "address": ADDRESS}}},
              ["amount", "currency"]),
        _tool("refund", "Refund a charge", {"charge": {"type": "string", "pattern": "^ch_[A-Za-z0-9]{24}$"},
                                            "reason": {"type": "string", "enum": [
                                                "duplicate", "fraudulent", "requested_by_customer"]}},
              ["charge"]),
    ],
    "calendar": [
        _tool("create_event", "Create an event", {
            "title": {"type": "string"}, "start": {"type": "string", "format": "date-time"},
            "end": {"type": "string", "format": "date-time"}, "time_zone": {"type": "string", "enum": TIME_ZONES},
            "attendees": {"type": "array", "items": {"type": "object", "properties": {
                "email": {"type": "string"}, "optional": {"type": "boolean"}}, "required": ["email"]}},
            "recurrence": {"type": "object", "properties": {
                "freq": {"type": "string", "enum": ["daily", "weekly", "monthly", "yearly"]},
                "interval": {"type": "integer", "minimum": 1}, "count": {"type": "integer"}}}},
              ["title", "start", "end"]),
        _tool("list_events", "List events", {"from": {"type": "string", "format": "date"},
                                             "to": {"type": "string", "format": "date"}}, ["from", "to"]),
    ],
    "no_parameters": [{"name": "get_time"}, {"name": "ping", "parameters": {"type": "object", "properties": {}}}],
    "many_small": [_tool(f"tool_{i}", "", {"x": {"type": "string"}}, ["x"]) for i in range(128)],
    "file_system": [
        _tool("write_tree", "Create a directory tree", {"root": {"$ref": "#/$defs/entry"}}, ["root"]),
    ],
}
TOOL_LISTS["file_system"][0]["parameters"]["$defs"] = {"entry": {
    "type": "object", "properties": {"name": {"type": "string"}, "content": {"type": "string"},
                                     "children": {"type": "array", "items": {"$ref": "#/$defs/entry"}}},
    "required": ["name"]}}
