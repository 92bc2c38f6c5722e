"""The YAML run recipes, shipped as package data of `unison.configs` (see launch/cli.py's
configs_dir): `unison` with no arguments runs tiny-wan.yaml from here."""
