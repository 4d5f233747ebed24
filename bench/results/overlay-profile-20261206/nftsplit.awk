BEGIN{RS=""}
{
  split($0, L, "\n"); comm=L[1]; sub(/ .*/, "", comm);
  if (comm !~ /iperf3|ksoftirqd/) next;
  tot++;
  if ($0 !~ /nft_do_chain/) next;
  hook="?";
  n=split($0, F, "\n");
  for (i=1;i<=n;i++) if (F[i] ~ /nf_hook_slow/) { nxt=F[i+1]; sub(/^[ \t]*[0-9a-f]+ /,"",nxt); sub(/\+.*/,"",nxt); hook=nxt; break }
  c[hook]++; nft++;
}
END { printf "samples(iperf3+ksoftirqd) %d, nft_do_chain %d (%.2f%%)\n", tot, nft, 100*nft/tot; for (h in c) printf "  %-28s %5d  %.2f%%\n", h, c[h], 100*c[h]/tot }
