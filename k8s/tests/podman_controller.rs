//! The controller image runs: built with podman from k8s/images/controller.Containerfile
//! (FROM scratch, the binary and the libraries it links, user 65532), started with a read-only
//! root, no capabilities and no network, it renders an example EdgeDeployment exactly as the
//! binary on the host does. That proves the image holds everything the binary needs to start
//! and to build every object (the `run` path needs an API server, which no test here has).

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

#[path = "../../hub/tests/support/podman.rs"]
mod podman;

use std::path::Path;
use std::process::Command;

#[test]
fn the_controller_image_renders_as_the_binary_does() {
    let Some(podman) = podman::Podman::or_skip("controller image renders") else {
        return;
    };
    let binary = Path::new(env!("CARGO_BIN_EXE_edgehub-controller"));
    let image = podman.image(podman::Image::Controller, binary);
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for example in ["minimal.yaml", "two-modules.yaml"] {
        let on_host = Command::new(binary)
            .arg("render")
            .arg(examples.join(example))
            .output()
            .unwrap();
        assert!(on_host.status.success(), "render {example} on the host");
        let mount = format!("{}:/examples:ro", examples.display());
        let in_image = podman
            .command()
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                "--read-only",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "-v",
                &mount,
                &image,
                "render",
                &format!("/examples/{example}"),
            ])
            .output()
            .unwrap();
        assert!(
            in_image.status.success(),
            "the image failed to render {example}: {}",
            String::from_utf8_lossy(&in_image.stderr)
        );
        assert!(
            !in_image.stdout.is_empty(),
            "the image printed nothing for {example}"
        );
        assert_eq!(
            String::from_utf8_lossy(&in_image.stdout),
            String::from_utf8_lossy(&on_host.stdout),
            "{example}: the image renders other objects than the binary"
        );
    }
    let user = podman.ok(&["image", "inspect", "--format", "{{.Config.User}}", &image]);
    assert_eq!(user, "65532:65532", "the image must run as non-root");
}
