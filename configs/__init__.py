"""Config files: `get_config(arg)` per experiment; `common` holds sections, sizes and defaults."""
