# Reads oslo.config files with oslo.config itself and prints, for every option
# they set, its value as a single-valued option (StrOpt) and as a multi-valued
# one (MultiStrOpt), as JSON. Arguments: files and directories, in order.
import json
import os
import sys

from oslo_config import cfg
from oslo_config import iniparser


class Names(iniparser.BaseParser):
    def __init__(self, found):
        self.found = found
        self.section = None

    def new_section(self, section):
        self.section = "DEFAULT" if section == "DEFAULT" else section.lower()

    def assignment(self, key, value):
        self.found.setdefault(self.section, set()).add(key)


def conf_files(paths):
    for p in paths:
        if os.path.isdir(p):
            for n in sorted(os.listdir(p)):
                if n.endswith(".conf"):
                    yield os.path.join(p, n)
        else:
            yield p


def main(paths):
    found = {}
    for f in conf_files(paths):
        with open(f) as fh:
            Names(found).parse(fh)
    args = []
    for p in paths:
        args += ["--config-dir" if os.path.isdir(p) else "--config-file", p]
    out = {}
    for kind, opt in (("single", cfg.StrOpt), ("multi", cfg.MultiStrOpt)):
        conf = cfg.ConfigOpts()
        for section, keys in found.items():
            group = None if section == "DEFAULT" else section
            for k in keys:
                conf.register_opt(opt(k), group=group)
        conf(args=args, project="reference", default_config_files=[], default_config_dirs=[])
        res = out.setdefault(kind, {})
        for section, keys in found.items():
            for k in keys:
                try:
                    v = conf[k] if section == "DEFAULT" else conf[section][k]
                except Exception as e:  # substitution errors
                    v = {"error": str(e)}
                res.setdefault(section, {})[k] = v
    json.dump(out, sys.stdout)


main(sys.argv[1:])
