//! Writes the custom resource definitions and their kustomization to the
//! directory given (what `cargo xtask crds` runs, so that xtask itself
//! links no Kubernetes client), and removes files there that it does not
//! write.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: crds <directory>"));
    std::fs::create_dir_all(&dir)?;
    let definitions = ambit_kube::crds::all();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let written = name == ambit_kube::crds::KUSTOMIZATION || definitions.iter().any(|(file, _)| file == name);
        if name.ends_with(".yaml") && !written {
            std::fs::remove_file(&path)?;
        }
    }
    for (file, crd) in &definitions {
        let path = dir.join(file);
        std::fs::write(&path, ambit_kube::crds::to_yaml(crd))?;
        println!("crds: wrote {}", path.display());
    }
    let path = dir.join(ambit_kube::crds::KUSTOMIZATION);
    std::fs::write(&path, ambit_kube::crds::kustomization())?;
    println!("crds: wrote {}", path.display());
    Ok(())
}
