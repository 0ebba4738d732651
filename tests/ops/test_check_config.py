"""`msgd --check-config`: what systemd's ExecReload= runs before SIGHUP, so that a broken
file fails `systemctl reload` itself. It must check what a reload reads: config, TLS files,
provisioning file."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import ROOT, make_deployment


def _check(config) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "msgd", "--config", str(config),
                           "--check-config"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)


def test_check_config_reads_tls_files_and_provisioning(tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki, ues={"a@x": ["gw1.example"], "b@x": ["gw1.example"]})
    done = _check(dep.config_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok (TLS files usable, 2 UEs provisioned)")

    (dep.dir / "ues.csv").write_text("ue_service_id,key,gateways\na@x,00,gw1.example\n")
    done = _check(dep.config_path)
    assert done.returncode == 2 and "line 2" in done.stderr and "key" in done.stderr

    dep.write_provisioning([("a@x", dep.keys["a@x"], ["gw1.example"])])
    text = dep.config_path.read_text()
    # A key that does not belong to the certificate: refused, without quoting the key.
    dep.config_path.write_text(text.replace(str(pki.server_key),
                                            str(pki.gateway_key("gw1.example"))))
    done = _check(dep.config_path)
    assert done.returncode == 2
    assert "does not match" in done.stderr and "PRIVATE KEY" not in done.stderr
    assert not (dep.dir / "registry.sqlite").exists(), "a check opens no registry"
