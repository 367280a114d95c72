//! Writes the custom resource definitions: the copies of Istio's and their
//! kustomization to the first directory given, ambit's own to the second
//! (what `cargo xtask crds` runs, so that xtask itself links no Kubernetes
//! client), and removes definition files there that it does not write.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

fn main() -> std::io::Result<()> {
    let mut dirs = std::env::args().skip(1).map(PathBuf::from);
    let (Some(istio), Some(own)) = (dirs.next(), dirs.next()) else {
        panic!("usage: crds <istio copies directory> <ambit's own directory>");
    };
    write(&istio, &ambit_kube::crds::all(), &[ambit_kube::crds::KUSTOMIZATION])?;
    let path = istio.join(ambit_kube::crds::KUSTOMIZATION);
    std::fs::write(&path, ambit_kube::crds::kustomization())?;
    println!("crds: wrote {}", path.display());
    write(&own, &ambit_kube::crds::ambit_own(), &[])
}

fn write(dir: &Path, definitions: &[(String, CustomResourceDefinition)], keep: &[&str]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let written = keep.contains(&name) || definitions.iter().any(|(file, _)| file == name);
        if name.ends_with(".yaml") && !written {
            std::fs::remove_file(&path)?;
        }
    }
    for (file, crd) in definitions {
        let path = dir.join(file);
        std::fs::write(&path, ambit_kube::crds::to_yaml(crd))?;
        println!("crds: wrote {}", path.display());
    }
    Ok(())
}
