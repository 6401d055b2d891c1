"""YAML -> validated, frozen Job records; schema checks and local image checks."""
