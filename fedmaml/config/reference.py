"""The configuration reference (docs/configuration.md) generated from the schema."""

from fedmaml.config.rules import CROSS_FIELD_RULES
from fedmaml.config.schema import SWEEP_SECTION, FieldSpec, schema, sections


def _default_text(spec: FieldSpec) -> str:
    value = spec.default
    if spec.is_list:
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def _allowed_md(spec: FieldSpec) -> str:
    if spec.choices is not None:
        listed = ", ".join(f"`{c}`" for c in spec.choices)
        return f"any of {listed}, each once" if spec.is_list else listed
    rng = spec.range_text()
    if spec.is_list:
        return f"each {rng}" if rng else ("integers" if spec.item_type is int else "strings")
    if rng:
        return rng
    return "`true`, `false`" if spec.type is bool else "any"


def config_reference_markdown() -> str:
    """A Markdown table per section: key, type, default, allowed values, description."""
    header = "| Key | Type | Default | Allowed | Description |\n|---|---|---|---|---|\n"

    def table(specs: list[FieldSpec]) -> str:
        return header + "".join(
            f"| `{s.path}` | {s.type_name} | {_default_text(s)} | {_allowed_md(s)} | {s.help} |\n"
            for s in specs)

    specs = schema()
    parts = ["## Top level\n\n" + table([s for s in specs if "." not in s.path])]
    for name, _, help in sections():
        parts.append(f"## `{name}`\n\n{help}\n\n"
                     + table([s for s in specs if s.path.startswith(name + ".")]))
    parts.append("## Rules involving several keys\n\n"
                 + "".join(f"- {rule}\n" for rule in CROSS_FIELD_RULES))
    parts.append(_SWEEP_SECTION_DOC)
    return "\n".join(parts)


_SWEEP_SECTION_DOC = f"""## `{SWEEP_SECTION}` (sweep files only)

A file given to `fedmaml sweep` may add a `{SWEEP_SECTION}:` section (`fedmaml run` refuses such a
file). `grid` maps keys (full, or an unambiguous suffix: `beta` for `algorithm.beta`) to lists of
values; every combination runs once per seed. `settings` (optional) names override sets, such as
`MOML: {{algorithm.name: moml, algorithm.eta: 0.005}}`, crossed with the grid; `references` gives a
named setting a number reported elsewhere (`text`), the metric it is a value of (`metric`) and the
rounds of its budget (`rounds`), shown by `fedmaml compare` beside that metric only. `seeds` is a list of integers
or a range such as `"0-4"` (default: the `seed` key). See docs/comparing.md.

```yaml
{SWEEP_SECTION}:
  grid:
    algorithm.beta: [0.3, 0.5, 0.9]
    mode: [cross_device, cross_silo]
  seeds: "0-4"
```
"""
