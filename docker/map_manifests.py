"""Write the MAP manifests (``app.json``, ``pkg.json``) the way ``monai-deploy package`` writes them.

    python3 map_manifests.py APP_YAML APP_DIR MODELS_DIR --out DIR

The packager (holoscan-cli 4.2) needs NVIDIA's registries and buildx, which a hospital's build host or
this project's CI may not reach, so the image is built from ``docker/Dockerfile`` instead; this script
runs holoscan-cli's own manifest code (``ApplicationConfiguration.populate_app_manifest`` /
``populate_package_manifest`` with its default MAP paths) on ``app.yaml``, so MONAI Deploy's runners
find what they expect at ``/etc/holoscan``. Two things the packager does not: ``application.timeout``
from ``app.yaml`` is used (the packager only takes ``--timeout``), and the models folder is read as the
image holds it (one entry per package sub-folder). ``--env`` prints the manifest's environment as
``KEY=VALUE`` lines, which the image test compares with the image's own variables.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

from holoscan_cli.common.enum_types import PlatformConfiguration, SdkType
from holoscan_cli.packager.config_reader import ApplicationConfiguration
from holoscan_cli.packager.parameters import PackageBuildParameters


def manifests(app_yaml: Path, app_dir: Path, models_dir: Path) -> tuple[dict, dict]:
    config = ApplicationConfiguration()
    config.read(app_yaml)  # validates the keys the packager requires
    application = config._config["application"]  # noqa: SLF001 (no public accessor in holoscan-cli 4.2)
    timeout = application.get("timeout", 0)
    if not isinstance(timeout, int) or timeout < 0:
        raise SystemExit(f"{app_yaml}: application.timeout must be a whole number of seconds, got {timeout!r}")
    params = PackageBuildParameters()
    params.application = app_dir  # a folder with __main__.py: ["python3", "/opt/holoscan/app"]
    params.timeout = timeout
    params.models = {p.name: p for p in sorted(models_dir.iterdir()) if p.is_dir()} if models_dir.is_dir() else None
    app = config.populate_app_manifest(params)
    app.sdk = SdkType.MonaiDeploy.value
    app.sdk_version = version("monai-deploy-app-sdk")
    pkg = config.populate_package_manifest(params)
    pkg.platform_config = PlatformConfiguration.dGPU.value
    return app.data, pkg.data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("app_yaml", type=Path)
    ap.add_argument("app_dir", type=Path)
    ap.add_argument("models_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="write app.json and pkg.json here")
    args = ap.parse_args(argv)
    app, pkg = manifests(args.app_yaml, args.app_dir, args.models_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    # Compact JSON, as the packager writes it (json.dumps of the manifest's data).
    (args.out / "app.json").write_text(json.dumps(app, default=str))
    (args.out / "pkg.json").write_text(json.dumps(pkg, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
