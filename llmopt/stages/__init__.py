"""Pipeline stages: each gets a typed config, its input artifacts and an empty directory."""
