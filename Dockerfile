# The BootSeer daemon image: the snapshotter (default command) and the registry sidecar
# (`docker run IMAGE sidecar serve ...`).  Built from the same installer as CI and the quickstart, so the image
# holds exactly what a node installed with integration/install.sh holds, minus the test extras.
#
#   docker build -t bootseer:dev .
#   docker build --build-arg BASE=my-bookworm-base --network host -t bootseer:dev .   # air-gapped: own base
#
# Run it privileged with /dev/fuse, host /var/lib/bootseer (mount propagation: bidirectional) and the containerd
# socket dir mounted: integration/k8s/daemonset.yaml does exactly that.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# Extra CA certificates (PEM), for builds behind a TLS-intercepting proxy to the Debian/PyPI mirrors.  They are
# public certificates, not secrets, and end up in the image's trust store like any CA installed on the node.
ARG EXTRA_CA_PEM=""
RUN if [ -n "$EXTRA_CA_PEM" ]; then mkdir -p /usr/local/share/ca-certificates \
      && printf '%s\n' "$EXTRA_CA_PEM" > /usr/local/share/ca-certificates/bootseer-build-extra.crt; fi

# System packages first: this layer only changes when the installer's package list does.  Only the daemons'
# packages (erofs-utils, fuse3, util-linux, …): the test and benchmark tools stay out of the image.
ENV BOOTSEER_PACKAGES=daemon
COPY integration/install.sh /opt/bootseer/src/integration/install.sh
RUN /opt/bootseer/src/integration/install.sh --system && rm -rf /var/lib/apt/lists/*

# The Python package into a venv (Debian's python3 is externally managed), without the test extras.
ENV BOOTSEER_EXTRAS="" PIP_NO_CACHE_DIR=1
COPY . /opt/bootseer/src
WORKDIR /opt/bootseer/src
RUN integration/install.sh && rm -rf /var/lib/apt/lists/* /root/.cache \
    && bootseer --help >/dev/null

ENTRYPOINT ["bootseer"]
CMD ["snapshotter", "serve", "--config", "/etc/bootseer/config.toml"]
