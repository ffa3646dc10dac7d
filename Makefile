# routing-agent — the two commands of the README are `make demo` and
# `make test`; both install what they need (Debian packages: containerd,
# runc, the CNI plugins, iproute2, nftables ...; and the lab's etcd,
# kube-apiserver, controller manager, scheduler, kubectl and kubelet, built
# from Go modules into a cache outside the repository).
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)

BIN := bin/routing-agent
# The agent image: `make image IMAGE=registry.example.com/routing-agent:v0.1.0`
# (add PUSH=1 to push it with the credentials of ~/.docker/config.json).
IMAGE ?= localhost/routing-agent:dev
IMAGE_ARCHIVE ?= _out/routing-agent.oci.tar

.PHONY: all build image deps lab-tools codegen verify-codegen vet unit test bench demo clean

all: build

build:
	go build -o $(BIN) ./cmd/routing-agent

# The agent's OCI image, built without Docker: the static binary on an empty
# base (go-containerregistry), written to $(IMAGE_ARCHIVE).
image:
	go run ./cmd/routing-lab image --image $(IMAGE) --out $(IMAGE_ARCHIVE) $(if $(PUSH),--push)

deps:
	@hack/install-deps.sh

# Builds (or finds in the cache) the lab control plane and prints its directory.
lab-tools: deps
	@hack/build-lab-tools.sh

codegen:
	hack/update-codegen.sh

verify-codegen:
	hack/verify-codegen.sh

vet:
	go vet ./...
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' | grep -v '^generated/')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted" >&2; exit 1; fi

# Fast tests that need neither root nor the lab control plane.
unit:
	go test -count=1 ./pkg/planner ./pkg/routespec ./pkg/selection ./pkg/nodefacts ./pkg/ociimage ./pkg/agent ./pkg/prober ./pkg/bypass

# Every test: generated code, vet, and the whole suite against a real
# kube-apiserver and etcd (and, where a test needs them, network namespaces
# as root). Every benchmark runs once too, in its short form (-short: fewer
# trials, shorter windows and outages), so they keep working; the figures
# come from make bench.
test: deps
	hack/verify-codegen.sh
	$(MAKE) --no-print-directory vet
	@# test/agent, the longest package by far (its lab agents mostly wait),
	@# runs beside all the others rather than after them.
	@lab_bin=$$(hack/build-lab-tools.sh) && \
	echo "lab control plane: $$lab_bin" && \
	export LAB_BIN_DIR=$$lab_bin && \
	{ go test -count=1 -timeout 40m -short -bench . -benchtime 1x ./test/agent & agent=$$!; } && \
	go test -count=1 -timeout 40m -short -bench . -benchtime 1x $$(go list ./... | grep -v '/test/agent$$'); rest=$$?; \
	wait $$agent; agent=$$?; \
	test $$rest -eq 0 -a $$agent -eq 0

# Benchmarks (root: they build network namespaces), all in one run:
#  - cold apply against ip -batch of the same objects, a failover of a
#    4,096-destination Route, one Route changed among 500 (pkg/applier);
#  - forwarded pps with 0, 100 and 1,000 Routes, traffic no Route matches
#    and traffic to a Route, and the ratios (pkg/applier Datapath), and the
#    cost of the connection-marking table (pkg/connmark);
#  - one Route changed among 1,000 through the agent's reconcile, with the
#    kernel view and with a full re-read (pkg/agent);
#  - the planner at the destination limit (pkg/planner);
#  - the CEL budget of the CRD (test/admission);
#  - one agent against the lab API server: Route-to-kernel latency, RSS with
#    1,000 and 10,000 Routes, failover and recovery times, catch-up after a
#    45 s API outage (test/agent; ~25 minutes).
bench: deps
	go test -count=1 -run '^$$' -bench 'Cold|Failover4096|Incremental|Compute' -benchtime 20x ./pkg/applier
	go test -count=1 -run '^$$' -bench 'Datapath' ./pkg/applier
	go test -count=1 -run '^$$' -bench 'Forwarding' ./pkg/connmark
	go test -count=1 -run '^$$' -bench . -benchtime 100x ./pkg/agent
	go test -count=1 -run '^$$' -bench . ./pkg/planner
	@lab_bin=$$(hack/build-lab-tools.sh) && \
	LAB_BIN_DIR=$$lab_bin go test -count=1 -run '^$$' -bench . -benchtime 1x ./test/admission && \
	LAB_BIN_DIR=$$lab_bin go test -count=1 -run '^$$' -bench . -benchtime 1x -timeout 60m ./test/agent

# The product end to end in a lab of network namespaces: a control plane,
# two nodes running real kubelets and containerd, NAT gateways, an external
# host; the agent image built as `make image` builds it and installed from
# manifests/ with kubectl apply -k.
demo: deps image
	@go build -o bin/routing-lab ./cmd/routing-lab
	@lab_bin=$$(hack/build-lab-tools.sh) && bin/routing-lab demo --repo . --image-archive $(IMAGE_ARCHIVE) --image $(IMAGE) --lab-bin $$lab_bin

clean:
	rm -rf bin _out
