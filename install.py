"""Run by the WebUI at start-up: installs only what is missing, never upgrading or downgrading what the WebUI pins."""

import launch

# import name -> pip requirement. Only packages the WebUI does not pin belong here; each is
# installed when absent and left alone when present, whatever its version.
REQUIREMENTS = {
    "safetensors": "safetensors",
    "segment_anything": "segment-anything==1.0",  # the Segment tab's SAM; it declares no dependencies
}

for module, requirement in REQUIREMENTS.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"sd-webui-anydressing requirement: {requirement}")
