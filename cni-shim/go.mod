module sanderling.io/cni-shim

go 1.21
